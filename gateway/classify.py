"""Classification before any rule: automatic mail, own addresses, subject tokens, threads, digests.

Pure functions over a `ParsedMail` (and the envelope, or the raw bytes for the digest); no I/O and
no spool look-ups: the worker feeds what these return (a reason, a ref, message ids, a digest) to
the spool and to the rules.

* `auto_reason` says why a mail is automatic (RFC 3834 Auto-Submitted, RFC 3464 / RFC 8098
  reports, Precedence, List-*, X-Autoreply and friends, the null envelope sender,
  MAILER-DAEMON / postmaster, explicit auto-reply or bounce subjects), or None. Not
  X-Auto-Response-Suppress: Exchange sets it on mail people write too, and it asks only that no
  automatic reply be sent (the acknowledgement policy honours that, gateway.ackpolicy); as a
  sign of automatic mail it lost their mail to Discourse, osTicket and Redmine users.
  The subject heuristic alone flags only explicit phrases at the very start of the subject
  ("Automatic reply:", "Abwesenheitsnotiz:", "Out of Office:"...), never "Re: out of office?".
* `is_own_address` recognises the gateway's own addresses (case-insensitive, +tags ignored).
* `find_subject_token` finds a ticket token such as "[Ticket #{ref}]" anywhere in the decoded
  subject (so after any reply/forward prefix); `strip_reply_prefixes` removes those prefixes.
* `thread_ids` lists In-Reply-To and References ids, most recent first.
* `content_digest` fingerprints a message so that the same mail delivered twice (SMTP retry,
  IMAP re-fetch, two routes) matches while a different mail reusing a Message-ID does not.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Collection, Iterable

from gateway.models import Envelope, ParsedMail, RawSource

__all__ = [
    "STABLE_DIGEST_HEADERS",
    "auto_reason",
    "compile_token_pattern",
    "content_digest",
    "envelope_sender",
    "find_subject_token",
    "is_own_address",
    "strip_reply_prefixes",
    "thread_ids",
]

# --------------------------------------------------------------------------------------------
# Automatic mail

_PRECEDENCE_AUTO = frozenset({"bulk", "junk", "list", "auto_reply", "auto-reply", "autoreply"})
_FALSE_VALUES = frozenset({"", "no", "false", "0", "off", "none"})
_DAEMONS = {"mailer-daemon": "mailer-daemon", "mailer_daemon": "mailer-daemon",
            "postmaster": "postmaster"}  # fmt: skip

# Explicit auto-reply phrases, as mail programs put them at the start of the subject.
_AUTO_PHRASES = (
    "automatic reply", "auto reply", "auto-reply", "autoreply", "auto response",
    "auto-response", "autoresponse", "automated reply", "out of office autoreply",
    "out of office auto reply", "out of office reply", "out of office", "out of the office",
    "abwesenheitsnotiz", "automatische antwort", "réponse automatique", "reponse automatique",
    "risposta automatica", "respuesta automática", "respuesta automatica", "resposta automática",
    "resposta automatica", "autosvar", "automatisk svar", "automatisch antwoord",
    "automatisch bericht", "automaattinen vastaus", "odpowiedź automatyczna",
    "automatická odpověď", "automatikus válasz", "otomatik yan\u0131t", "automatski odgovor",
    "автоматический ответ", "автоответ", "αυτόματη απάντηση", "自動応答", "自動返信",
    "自动回复", "自動回覆", "자동 응답",
)  # fmt: skip
_BOUNCE_SUBJECT = re.compile(
    r"^\s*(?:undeliverable\s*:|unzustellbar\s*:|non remis\s*:|onbestelbaar\s*:"
    r"|undelivered mail returned to sender|delivery status notification \((?:failure|delay)\)"
    r"|mail delivery failed\s*:|returned mail\s*:|failure notice\s*$"
    r"|delivery failure notification)",
    re.IGNORECASE,
)


def _alternation(words: tuple[str, ...]) -> str:
    escaped = (r"\s+".join(re.escape(part) for part in w.split()) for w in words)
    return "|".join(sorted(escaped, key=len, reverse=True))


_AUTO_ALTERNATION = _alternation(_AUTO_PHRASES)
_AUTO_SUBJECT = re.compile(
    rf"^\s*(?:\[\s*(?:{_AUTO_ALTERNATION})\s*\]|(?:{_AUTO_ALTERNATION})\s*(?:[:\uff1a]|$))",
    re.IGNORECASE,
)


def envelope_sender(mail: ParsedMail, envelope: Envelope) -> str | None:
    """The envelope sender ("" = null sender <>), or None when it is not known.

    The SMTP intake knows it. The pipe and IMAP intakes may not (IMAP never sees the SMTP
    envelope): for them an empty `mail_from` means "unknown", and the Return-Path header that the
    final MTA wrote stands in for it.
    """
    if envelope.intake == "smtp":
        return _bare(envelope.mail_from)
    if envelope.mail_from:
        return _bare(envelope.mail_from)
    return_path = mail.header("Return-Path")
    if return_path is None:
        return None
    return _bare(return_path)


def _bare(addr: str) -> str:
    addr = addr.strip()
    if "<" in addr and ">" in addr:
        addr = addr[addr.index("<") + 1 : addr.rindex(">")]
    return addr.strip().lower()


def _token(value: str) -> str:
    """First word of a header value, without comments or parameters, lower-case."""
    value = re.sub(r"\([^)]*\)", " ", value).split(";", 1)[0]
    return value.strip().strip("\"'").strip().lower()


def _local_part(addr: str) -> str:
    return addr.rpartition("@")[0] if "@" in addr else addr


def auto_reason(mail: ParsedMail, envelope: Envelope) -> str | None:
    """Why `mail` is automatic (a short reason, for logs and `gateway route`), or None."""
    value = mail.header("Auto-Submitted")
    if value is not None:
        token = _token(value)
        if token and token != "no":
            return f"auto-submitted: {token}"
    report = mail.report_type.lower()
    if report == "delivery-status":
        return "delivery status notification (RFC 3464)"
    if report == "disposition-notification":
        return "disposition notification (RFC 8098)"
    if report:
        return f"report: {report}"
    if mail.content_type in ("message/delivery-status", "message/disposition-notification"):
        return f"report: {mail.content_type}"
    sender = envelope_sender(mail, envelope)
    if sender == "":
        return "null envelope sender"
    for addr in (mail.from_addr, sender or ""):
        daemon = _DAEMONS.get(_local_part(addr).lower())
        if daemon:
            return daemon
    for name in ("X-Autoreply", "X-Autorespond", "X-Autogenerated"):
        value = mail.header(name)
        if value is not None and _token(value) not in _FALSE_VALUES - {""}:
            return name.lower()
    value = mail.header("Precedence")
    if value is not None:
        token = _token(value)
        if token in _PRECEDENCE_AUTO:
            return f"precedence: {token}"
    if mail.header("List-Id") is not None:
        return "list-id"
    if mail.header("List-Unsubscribe") is not None:
        return "list-unsubscribe"
    if _AUTO_SUBJECT.match(mail.subject):
        return "subject looks like auto reply"
    if _BOUNCE_SUBJECT.match(mail.subject):
        return "subject looks like a bounce"
    return None


# --------------------------------------------------------------------------------------------
# Own addresses


def _normalise_address(addr: str) -> str:
    addr = addr.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    addr = addr.lower()
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr
    base = local.split("+", 1)[0]
    return f"{base or local}@{domain}"


def is_own_address(addr: str, own: Collection[str]) -> bool:
    """True when `addr` is one of `own` (case-insensitive; "+tag" in the local part ignored)."""
    if not addr or not own:
        return False
    wanted = _normalise_address(addr)
    return any(_normalise_address(o) == wanted for o in own)


# --------------------------------------------------------------------------------------------
# Subjects

# Reply and forward prefixes in many languages (RE, AW, SV, VS, Antw, Réf, TR, WG, FW, Fwd...).
_PREFIX_WORDS = (
    "re", "aw", "sv", "vs", "antw", "antwort", "odp", "ynt", "res", "rif", "r", "rv", "rép",
    "rép.", "réf", "réf.", "ref", "fwd", "fw", "wg", "tr", "enc", "doorst", "pd", "vb", "vl",
    "ilt", "fs", "vá", "továbbítás", "bls", "atb", "sv", "odg", "pfwd", "weiterleitung",
    "απ", "σχετ", "πρθ", "отв", "ответ", "пересл", "תשובה", "הועבר", "رد", "توجيه",
    "回复", "答复", "回覆", "转发", "轉寄", "轉發", "返信", "転送", "회신", "답장", "전달",
    *_AUTO_PHRASES,
)  # fmt: skip
_PREFIXES = re.compile(
    rf"^(?:\s*(?:{_alternation(_PREFIX_WORDS)})\s*(?:\[\d+\]|\(\d+\)|\^\d+)?\s*[:\uff1a])+\s*",
    re.IGNORECASE,
)


def strip_reply_prefixes(subject: str) -> str:
    """The subject without leading reply/forward/auto-reply prefixes ("Re: AW: Fwd: x" → "x")."""
    return _PREFIXES.sub("", subject, count=1).strip()


@functools.lru_cache(maxsize=64)
def compile_token_pattern(pattern: str) -> re.Pattern[str]:
    """A token format like "[Ticket #{ref}]" as a regex with the group `ref`.

    `{ref}` matches `[A-Za-z0-9-]+` (at most 64 characters, not part of a longer run); the rest is
    literal and case-insensitive, a space matching any run of white space. Raises ValueError
    unless `{ref}` occurs exactly once (config validation calls this at load).
    """
    if pattern.count("{ref}") != 1:
        raise ValueError(f"token pattern {pattern!r} must contain {{ref}} exactly once")
    before, after = pattern.split("{ref}")

    def literal(text: str) -> str:
        return r"\s+".join(re.escape(piece) for piece in text.split(" "))

    ref = r"(?<![A-Za-z0-9-])(?P<ref>[A-Za-z0-9-]{1,64})(?![A-Za-z0-9-])"
    return re.compile(literal(before) + ref + literal(after), re.IGNORECASE)


def find_subject_token(subject: str, patterns: list[str]) -> str | None:
    """The ref of the leftmost token of any of `patterns` in the (decoded) subject, or None.

    Searching the whole subject finds the token after any reply, forward or auto-reply prefix.
    When several tokens are present, the leftmost wins (the most recent prefix); on a tie, the
    earlier pattern.
    """
    best: tuple[int, int, str] | None = None
    for order, pattern in enumerate(patterns):
        m = compile_token_pattern(pattern).search(subject)
        if m and (best is None or (m.start(), order) < best[:2]):
            best = (m.start(), order, m.group("ref"))
    return best[2] if best else None


# --------------------------------------------------------------------------------------------
# Threads


def thread_ids(mail: ParsedMail) -> list[str]:
    """In-Reply-To, then References from the newest to the thread root; no duplicates."""
    seen: set[str] = set()
    out: list[str] = []
    for mid in (*mail.in_reply_to, *reversed(mail.references)):
        if mid and mid not in seen:
            seen.add(mid)
            out.append(mid)
    return out


# --------------------------------------------------------------------------------------------
# Duplicates

# The headers that a relay does not change. Everything else is left out: trace headers
# (Received, Return-Path, Delivered-To, X-Gateway-*, DKIM/ARC signatures, Authentication-Results)
# differ between two deliveries of one mail.
STABLE_DIGEST_HEADERS = ("from", "to", "cc", "subject", "date", "message-id")

_HEADER_BLOCK = re.compile(rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*:|[ \t])[^\n]*(?:\n|\Z))*")
_LEADING_BLANK = re.compile(rb"(?:\xef\xbb\xbf)?(?:[ \t]*\r?\n)*")
_HEADER_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:([^\n]*(?:\n[ \t][^\n]*)*)", re.M)
_WHITE = re.compile(rb"\s+")
_LINE_END = re.compile(rb"[ \t]*\r?\n")
_TRAILING_WHITE = frozenset(b" \t\n\r\x0b\x0c")  # what bytes.rstrip() removes
_DIGEST_PIECE = 1 << 18
_DIGEST_HEAD = 1 << 20


def content_digest(raw: bytes | bytearray | memoryview | RawSource) -> str:
    """SHA-256 (hex) over the stable headers and the body, normalised.

    Normalised: header names lower-case, values unfolded with white space collapsed, in the fixed
    order of `STABLE_DIGEST_HEADERS`; body line ends as LF, trailing white space on lines and at
    the end removed. So CRLF versus LF delivery, added trace headers, re-folding or re-ordering
    of headers do not change the digest; any change of text, attachment or stable header does.

    `raw` may be a RawSource (a big mail in the spool): it is read in pieces, never whole.
    """
    if isinstance(raw, bytes | bytearray | memoryview):
        data = raw
        size = len(data)

        def get(a: int, b: int) -> bytes:
            return bytes(data[a:b])

        head = bytes(data) if size <= _DIGEST_HEAD else get(0, _DIGEST_HEAD)
    else:
        source = raw
        size = source.size

        def get(a: int, b: int) -> bytes:
            return source.read(a, max(0, b - a))

        head = get(0, min(size, _DIGEST_HEAD))
    start = _LEADING_BLANK.match(head)
    pos = start.end() if start else 0
    block = _HEADER_BLOCK.match(head, pos)
    end = block.end() if block else pos
    if end >= len(head) and size > len(head):  # a header section longer than the first piece
        head = get(0, size)
        block = _HEADER_BLOCK.match(head, pos)
        end = block.end() if block else pos
    fields: dict[bytes, list[bytes]] = {}
    for m in _HEADER_FIELD.finditer(head[pos:end]):
        name = m.group(1).lower()
        if name.decode("ascii") in STABLE_DIGEST_HEADERS:
            fields.setdefault(name, []).append(_WHITE.sub(b" ", m.group(2)).strip())
    digest = hashlib.sha256()
    for name in STABLE_DIGEST_HEADERS:
        for value in fields.get(name.encode("ascii"), []):
            digest.update(name.encode("ascii") + b":" + value + b"\n")
    digest.update(b"\n")
    # The body, normalised as `_LINE_END.sub(b"\n", body).rstrip()` would, in pieces cut after a
    # line end (no match crosses a cut), so that a big mail is not copied whole. Stripping the
    # trailing white space first gives the same bytes: no line-end match ends in what remains.
    pos = end
    blank = _LINE_END.match(head, pos)
    if blank:
        pos = blank.end()
    del head
    stop = size
    while stop > pos:
        window = get(max(pos, stop - 4096), stop)
        kept = window.rstrip()  # the white space bytes.rstrip() removes: _TRAILING_WHITE
        if kept:
            stop -= len(window) - len(kept)
            break
        stop -= len(window)
    while pos < stop:
        piece = get(pos, min(stop, pos + _DIGEST_PIECE))
        if pos + len(piece) < stop:
            nl = piece.rfind(b"\n")
            while nl < 0 and pos + len(piece) < stop:  # one line longer than a piece
                piece += get(pos + len(piece), min(stop, pos + len(piece) + _DIGEST_PIECE))
                nl = piece.rfind(b"\n")
            if nl >= 0 and pos + len(piece) < stop:
                piece = piece[: nl + 1]
        digest.update(_normalise_lines(piece))
        pos += len(piece)
    return digest.hexdigest()


def _normalise_lines(piece: bytes) -> bytes:
    """`_LINE_END.sub(b"\n", piece)`: each line end (LF, or CR LF) as LF with the spaces and tabs
    before it removed. Line by line with bytes methods: the regular expression tried a match at
    every space of the text (three quarters of a digest's CPU; `_LINE_END.sub` is the reference
    of the tests)."""
    lines = piece.split(b"\n")
    last = lines.pop()  # after the last line end: not a line end, left as it is
    out = [(line[:-1] if line.endswith(b"\r") else line).rstrip(b" \t") for line in lines]
    out.append(last)
    return b"\n".join(out)


# Subject tokens the ticket systems write themselves (recognised besides each backend's own).
SYSTEM_TOKENS = ("[Ticket ID: {ref}]",)  # WHMCS


def token_formats(backend_tokens: Iterable[str]) -> list[str]:
    """Every subject-token format to look for: the backends' own and the systems' (WHMCS)."""
    return sorted({*backend_tokens, *SYSTEM_TOKENS})


def loop_reason(mail: ParsedMail, envelope: Envelope, own: Collection[str]) -> str | None:
    """Why this mail is a loop (it comes from one of our own addresses), or None."""
    for addr in (mail.from_addr, envelope.mail_from):
        if addr and is_own_address(addr, own):
            return f"loop: mail from our own address {addr}"
    return None
