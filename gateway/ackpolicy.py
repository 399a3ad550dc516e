"""Who may receive an acknowledgement, and under which rate-limit keys: pure decisions, no I/O.

An acknowledgement is mail the company's own server sends to an address that a stranger wrote
into a header. Unchecked, that makes the gateway a relay for spam and backscatter (RFC 3834 §4:
respond only where the response is wanted, never to forged or automatic mail). This module owns
the checks that do not need stored state, so that `gateway route` (the dry run) and the worker
decide the same way:

* `ack_verdict` picks the recipient (Reply-To only where it is the From's own domain when
  authentication is required) and says no for automatic mail, a sender who asked for no
  automatic replies (X-Auto-Response-Suppress: All or AutoReply), our own addresses, no-reply
  addresses and, with `require = "authenticated"`, for a sender whose authentication a trusted
  `Authentication-Results` header (RFC 8601) does not vouch for;
* `sender_authentication` reads those headers: only the topmost one of each trusted
  authserv-id counts (the MTA in front must strip or rename forged copies with its own id,
  RFC 8601 §5; the topmost is the one it added), and a pass counts only when aligned with the
  From domain (DMARC pass; DKIM pass with `header.d` of From's organisational domain; SPF pass
  for an envelope sender of From's organisational domain);
* `rate_keys` gives the keys the hourly limits count on: the normalised address (case, `+tag`,
  the sub-addressing the big providers document, Gmail's dots) and the organisational domain,
  so that `victim+1@`, `Victim+2@`, `v.i.c.t.i.m@gmail` all count as one sender;
* `safe_subject` is the only form of a stranger's subject the default template quotes;
* `own_dkim_wanted` says when the gateway's own DKIM check (`[ack] verify_dkim`, done with I/O in
  gateway.dkimcheck) is worth its cost; its `DkimResult` is an input of `apply_policy`.

The hourly counters themselves live in the spool (they must hold across processes and nodes);
see `Spool.finish` / `AckLimits`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Iterable
from dataclasses import dataclass

from gateway.models import Decision, Envelope, ParsedMail

__all__ = [
    "NO_ACK",
    "AckPolicy",
    "AckVerdict",
    "AuthResult",
    "DkimResult",
    "ack_verdict",
    "apply_policy",
    "from_domain",
    "normalise_address",
    "org_domain",
    "own_dkim_wanted",
    "parse_authentication_results",
    "rate_keys",
    "safe_subject",
    "sender_authentication",
]


@dataclass(frozen=True)
class AckPolicy:
    """The `[ack]` settings the decision needs (plain values; built by app/cli from config)."""

    enabled: bool = True
    require: str = "none"  # "none" | "authenticated"
    trusted_authserv_ids: frozenset[str] = frozenset()
    own_addresses: frozenset[str] = frozenset()
    never_to: tuple[str, ...] = ()
    verify_dkim: bool = False  # the gateway's own DKIM check where no trusted header vouches


@dataclass(frozen=True)
class DkimSettings:
    """Where the gateway's own DKIM check (gateway.dkimcheck) looks keys up: plain values from
    `[ack]` (built by app/cli). Here, not in dkimcheck, so that building the worker's settings
    does not load dkimpy and dnspython, which only that rare check needs."""

    nameservers: tuple[str, ...] = ()  # "ip" or "ip:port"; () = the system's resolver
    timeout: float = 5.0  # seconds per key look-up


@dataclass(frozen=True)
class DkimResult:
    """What the gateway's own DKIM check found (gateway.dkimcheck.check)."""

    passed: str  # e.g. "dkim=pass (d=example.com, aligned with From) verified by the gateway"
    why: str = ""  # why not, when `passed` is ""


@dataclass(frozen=True)
class AckVerdict:
    """Where an acknowledgement may go (`rcpt`), or why none may (`rcpt` is None)."""

    rcpt: str | None
    reason: str
    authenticated: str = ""  # e.g. "dmarc=pass by mx.example.com", "" when not authenticated


# -- addresses -------------------------------------------------------------------------------------

# Domains whose mailbox provider documents more than "+tag" sub-addressing. Over-normalising is
# harmless here (two real people share one hourly counter); under-normalising lets a stranger
# send one acknowledgement per variant to a victim.
_DOTS_IGNORED = frozenset({"gmail.com", "googlemail.com"})  # Gmail: dots in the local part
_DOMAIN_ALIASES = {"googlemail.com": "gmail.com"}
_EXTRA_SEPARATORS = {  # besides "+", which every domain is assumed to use
    "yahoo.com": "-",  # Yahoo disposable addresses: basename-keyword@
    "ymail.com": "-",
    "rocketmail.com": "-",
}
# Second-level labels under which a country code's registrable domains sit (co.uk, com.au...).
_SECOND_LEVEL = frozenset(
    {"co", "com", "net", "org", "gov", "edu", "ac", "or", "ne", "go", "gv", "ltd", "plc", "nic"}
)


def _domain(domain: str) -> str:
    domain = domain.strip().strip(".").lower()
    try:
        domain = domain.encode("idna").decode("ascii")
    except (UnicodeError, ValueError):
        pass
    return _DOMAIN_ALIASES.get(domain, domain)


def normalise_address(addr: str) -> str:
    """One key per mailbox: lower case, `+tag` (and the provider's own tag separator) and
    Gmail's dots removed, IDN domains in their ASCII form. Not an address to send to."""
    addr = addr.strip()
    if addr.startswith("<") and addr.endswith(">"):
        addr = addr[1:-1].strip()
    local, at, domain = addr.rpartition("@")
    if not at:
        return addr.lower()
    local = local.strip('"').lower()
    domain = _domain(domain)
    base = local.split("+", 1)[0] or local
    sep = _EXTRA_SEPARATORS.get(domain)
    if sep:
        base = base.split(sep, 1)[0] or base
    if domain in _DOTS_IGNORED:
        base = base.replace(".", "") or base
    return f"{base}@{domain}"


def org_domain(domain: str) -> str:
    """The organisational (registrable) domain, approximated without a public-suffix list:
    the last two labels, or three under a country code's second level (example.co.uk).
    Used for DMARC-style relaxed alignment and for the per-domain limit."""
    labels = [x for x in _domain(domain).split(".") if x]
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def _domain_of(addr: str) -> str:
    addr = addr.strip().strip("<>")
    return addr.rpartition("@")[2] if "@" in addr else addr


def rate_keys(rcpt: str) -> tuple[str, str]:
    """(normalised sender, organisational domain): what the hourly limits count on."""
    return normalise_address(rcpt), org_domain(_domain_of(rcpt))


# -- Authentication-Results (RFC 8601) -------------------------------------------------------------


@dataclass(frozen=True)
class AuthResult:
    method: str  # dmarc, dkim, spf, ...
    result: str  # pass, fail, none, ...
    props: dict[str, str]  # "header.d" -> "example.com", "smtp.mailfrom" -> ...


def _strip_comments(value: str) -> str:
    """Remove RFC 5322 comments (nested parentheses), keeping quoted strings."""
    out: list[str] = []
    depth = 0
    quoted = escaped = False
    for ch in value:
        if escaped:
            if depth == 0:
                out.append(ch)
            escaped = False
            continue
        if ch == "\\":
            escaped = True
            if depth == 0:
                out.append(ch)
            continue
        if quoted:
            out.append(ch)
            if ch == '"':
                quoted = False
            continue
        if ch == "(":
            depth += 1
            continue
        if ch == ")" and depth:
            depth -= 1
            continue
        if depth:
            continue
        if ch == '"':
            quoted = True
        out.append(ch)
    return "".join(out)


def _split_semicolons(value: str) -> list[str]:
    parts: list[str] = []
    buf: list[str] = []
    quoted = False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == ";" and not quoted:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return [p.strip() for p in parts]


_PAIR = re.compile(r'([A-Za-z0-9_.\-/]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^\s;]+)')


def parse_authentication_results(value: str) -> tuple[str, list[AuthResult]] | None:
    """(authserv-id, results) of one header value; None when it is not readable."""
    text = " ".join(_strip_comments(value).split())
    parts = _split_semicolons(text)
    head = parts[0].split()
    if not head:
        return None
    authserv = head[0].strip('"').lower().rstrip(".")
    results: list[AuthResult] = []
    for part in parts[1:]:
        pairs = _PAIR.findall(part)
        if not pairs:
            continue  # "none": no authentication was done
        method, result = pairs[0]
        method = method.split("/", 1)[0].lower()
        props: dict[str, str] = {}
        for k, v in pairs[1:]:
            props.setdefault(k.lower(), v.strip('"').lower())
        results.append(AuthResult(method, result.strip('"').lower(), props))
    return authserv, results


def _aligned(domain: str, from_domain: str) -> bool:
    if not domain or not from_domain:
        return False
    return org_domain(domain) == org_domain(from_domain)


def sender_authentication(
    mail: ParsedMail, envelope: Envelope, trusted: Iterable[str]
) -> tuple[str, str]:
    """(how the From address is authenticated, "" when it is not; what was found otherwise)."""
    trusted_ids = {t.lower().rstrip(".") for t in trusted}
    from_domain = _domain_of(mail.from_addr) if "@" in mail.from_addr else ""
    if not from_domain:
        return "", "the mail has no From address to authenticate"
    seen: set[str] = set()
    untrusted: list[str] = []
    for value in mail.header_all("Authentication-Results"):
        parsed = parse_authentication_results(value)
        if parsed is None:
            continue
        authserv, results = parsed
        if authserv not in trusted_ids:
            untrusted.append(authserv)
            continue
        if authserv in seen:
            continue  # only the topmost header of a trusted authserv-id counts
        seen.add(authserv)
        for r in results:
            if r.result != "pass":
                continue
            if r.method == "dmarc":
                hfrom = r.props.get("header.from", from_domain)
                if _aligned(hfrom, from_domain):
                    return f"dmarc=pass by {authserv}", ""
            elif r.method == "dkim":
                d = r.props.get("header.d") or _domain_of(r.props.get("header.i", ""))
                if _aligned(d, from_domain):
                    return f"dkim=pass (d={d}, aligned with From) by {authserv}", ""
            elif r.method == "spf":
                mfrom = r.props.get("smtp.mailfrom") or envelope.mail_from
                if _aligned(_domain_of(mfrom), from_domain):
                    return f"spf=pass (envelope sender aligned with From) by {authserv}", ""
    if seen:
        return "", (
            f"Authentication-Results of {', '.join(sorted(seen))} show no DMARC pass, aligned"
            " DKIM pass or aligned SPF pass for the From domain"
        )
    if untrusted:
        return "", (
            "Authentication-Results only from untrusted authserv-id(s)"
            f" {', '.join(sorted(set(untrusted)))} (ignored; see [ack] trusted_authserv_ids)"
        )
    return "", "no Authentication-Results header from a trusted authserv-id"


# -- the decision ----------------------------------------------------------------------------------


def own_dkim_wanted(
    decision: Decision, mail: ParsedMail, envelope: Envelope, policy: AckPolicy
) -> bool:
    """Whether the gateway should verify DKIM itself before `apply_policy`: only when an
    acknowledgement hinges on it (authentication required, the rules want one, no trusted header
    vouches for the sender) and the mail carries a DKIM-Signature. Bounds what a stranger can
    make the gateway compute or look up."""
    if not (policy.verify_dkim and policy.enabled and policy.require == "authenticated"):
        return False
    if decision.ack is None or decision.automatic or not mail.header_all("DKIM-Signature"):
        return False
    if "@" not in mail.from_addr:
        return False
    authenticated, _why = sender_authentication(mail, envelope, policy.trusted_authserv_ids)
    return not authenticated


def from_domain(mail: ParsedMail) -> str:
    """The From address's domain ("" when there is none)."""
    return _domain_of(mail.from_addr) if "@" in mail.from_addr else ""


# MS-OXCMAIL 2.2.3.2.20: X-Auto-Response-Suppress lists what the sender wants no automatic answer
# of (DR, NDR, RN, NRN, OOF, AutoReply, All); an acknowledgement is an auto-reply
_SUPPRESS_AUTOREPLY = frozenset({"all", "autoreply"})


def _suppresses_autoreply(value: str | None) -> bool:
    if not value:
        return False
    tokens = {t.strip().lower() for t in re.split(r"[,;\s]+", value) if t.strip()}
    return bool(tokens & _SUPPRESS_AUTOREPLY)


def ack_verdict(
    mail: ParsedMail, envelope: Envelope, policy: AckPolicy, dkim: DkimResult | None = None
) -> AckVerdict:
    """Whether an acknowledgement may go out for this mail and to whom (before rate limits).
    `dkim` is the gateway's own DKIM check, where one was made (`own_dkim_wanted`)."""
    if not policy.enabled:
        return AckVerdict(None, "acknowledgements are off ([ack] enabled = false)")
    if not envelope.mail_from and envelope.intake == "smtp":
        return AckVerdict(None, "null envelope sender: never answered (RFC 3834)")
    if _suppresses_autoreply(mail.header("X-Auto-Response-Suppress")):
        return AckVerdict(
            None, "the sender asked for no automatic replies (X-Auto-Response-Suppress)"
        )
    authenticated = ""
    from_addr = mail.from_addr.lower()
    if policy.require == "authenticated":
        authenticated, why = sender_authentication(mail, envelope, policy.trusted_authserv_ids)
        if not authenticated and dkim is not None:
            authenticated = dkim.passed
            why = f"{why}; {dkim.why}" if dkim.why else why
        elif not authenticated and policy.verify_dkim and not mail.header_all("DKIM-Signature"):
            why = f"{why}; no DKIM-Signature for the gateway to verify"
        if not authenticated:
            return AckVerdict(None, f"sender not authenticated: {why}")
        rcpt = from_addr
        reply_to = mail.reply_to.lower()
        if reply_to and _aligned(_domain_of(reply_to), _domain_of(from_addr)):
            rcpt = reply_to  # a Reply-To in the authenticated domain is the sender's own choice
    else:
        rcpt = (mail.reply_to or mail.from_addr or envelope.mail_from).lower()
    if not rcpt or "@" not in rcpt:
        return AckVerdict(None, "no address to answer")
    key = normalise_address(rcpt)
    if any(normalise_address(o) == key for o in policy.own_addresses):
        return AckVerdict(None, "the reply address is one of our own addresses")
    if any(fnmatch.fnmatchcase(rcpt, p.lower()) for p in policy.never_to):
        return AckVerdict(None, "the reply address is a no-reply address ([ack] never_to)")
    how = f" ({authenticated})" if authenticated else ""
    return AckVerdict(rcpt, f"acknowledgement to the sender{how}", authenticated)


NO_ACK = "no acknowledgement: "  # how a route reason saying why none goes out begins


def apply_policy(
    decision: Decision,
    mail: ParsedMail,
    envelope: Envelope,
    policy: AckPolicy,
    dkim: DkimResult | None = None,
) -> tuple[Decision, AckVerdict | None]:
    """The decision with `ack` cleared, and a reason added, where the policy forbids one.

    Returns the verdict too (None when the rules asked for no acknowledgement at all)."""
    if decision.ack is None or decision.automatic:
        return decision, None
    verdict = ack_verdict(mail, envelope, policy, dkim)
    if verdict.rcpt is None:
        reasons = (*decision.reasons, f"{NO_ACK}{verdict.reason}")
        return dataclasses.replace(decision, ack=None, reasons=reasons), verdict
    if verdict.authenticated:
        reasons = (*decision.reasons, f"acknowledgement allowed: {verdict.authenticated}")
        return dataclasses.replace(decision, reasons=reasons), verdict
    return decision, verdict


# -- what the default template may quote ------------------------------------------------------------

SAFE_SUBJECT_CHARS = 60
_URL = re.compile(r"(?i)\b(h)(tt)(ps?)(://)")
_SCHEMES = re.compile(r"(?i)\b(ftp|www)(\.|://)")
_DOTTED = re.compile(r"(?i)(?<=[a-z0-9\-])\.(?=[a-z0-9\-]*[a-z][a-z0-9\-]*\b)")
_AT = re.compile(r"(?<=\S)@(?=\S)")


def safe_subject(subject: str, limit: int = SAFE_SUBJECT_CHARS) -> str:
    """A stranger's subject as the default template may quote it: one line, cut to `limit`
    characters, links defanged (`hxxp://example[.]com`), so an acknowledgement cannot carry a
    clickable spam link or a readable spam message to a forged address."""
    text = " ".join(subject.split())
    if len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    text = _URL.sub(lambda m: "hxxp" + m.group(3)[1:] + m.group(4), text)
    text = _SCHEMES.sub(lambda m: m.group(1) + ("[.]" if m.group(2) == "." else m.group(2)), text)
    text = _DOTTED.sub("[.]", text)
    text = _AT.sub("[at]", text)
    return text or "(no subject)"
