"""Parsing: raw mail bytes in, one frozen `ParsedMail` out. Pure CPU work, no I/O.

This module owns everything between the bytes the intake stored and the decoded values the
rest of the pipeline reads: MIME structure, charsets, RFC 2047 words, addresses, the text body,
attachments (TNEF included) and the list of what had to be repaired (`ParsedMail.defects`).

Which library does what, and why
    * MIME structure: the standard library's feed parser with `policy.compat32`, fed in chunks.
      compat32 never raises on access, keeps raw header values, and is the fastest policy.
      A small subclass bounds the nesting depth (the stdlib recurses once per level and fails
      with RecursionError near 1,000 levels; depth also makes every line cost O(depth)).
      `mailparser.MailParser` itself is not used for the walk: it copies every attachment into
      a base64 string and decodes bodies without the repairs below.
    * Addresses: mail-parser's structural address scanner (`mailparser.utils.get_addresses`).
      It decodes display names in lexical context and never promotes an address-looking
      display name to the mailbox: `"support@example.com" <evil@attacker.test>` gives
      evil@attacker.test. This is where mail-parser is better than the stdlib.
    * RFC 2047 words: our own decoder (the stdlib's `decode_header` garbles raw UTF-8 next to
      encoded words and loses words broken by folding); charsets as below.

Repairs (each recorded in `defects`, except the cp1252 rule, which is how the web decodes too)
    * ISO-8859-1 / US-ASCII labels are decoded as Windows-1252 (a superset for text), unless
      the bytes are plainly UTF-8; 8-bit data without a usable label is UTF-8 when valid, else
      Windows-1252; "UTF-8" that has no valid multi-byte sequence at all is Windows-1252.
    * Unknown or unusable charsets: UTF-8 with replacement characters. Known-weak labels get
      their superset (ISO-2022-JP → its extensions, Shift_JIS → cp932, GB2312 → GB18030,
      Big5 → Big5-HKSCS, KS C 5601 / EUC-KR → cp949, TIS-620 → cp874); invalid data is
      decoded with replacement characters, never raised.
    * Raw 8-bit headers (RFC 6532): UTF-8 when valid, else Windows-1252.
    * Encoded words split by header folding are rejoined; adjacent words of one charset are
      decoded together (a character split across two words survives).
    * A multipart without a usable boundary: the boundary is guessed from the body (a `--token`
      line seen at least twice); failing that, the body is kept as text. An unclosed boundary
      keeps every part up to the end.
    * Nesting deeper than `MAX_DEPTH`: the inner structure is kept undecoded as an attachment.
    * No header section at all: the whole input is the body (the stdlib's own test corpus has
      such a message). Only empty input, or input without headers that is not text either
      (NUL bytes or mostly control bytes), raises `ParseError`.

Sender identity
    * `from_addr` is the first address of From, else of Reply-To, else of Sender ("" when none:
      the envelope is not known here, the worker may fall back to it); addresses lower-case,
      display names decoded. A display name that looks like another address stays a name
      (and adds a defect); it never becomes `from_addr`.

Body and attachments (what a helpdesk agent wants to read)
    * `text` is the text/plain body; where a body part has only HTML, the HTML converted to
      text (links kept as "text (url)", scripts and styles dropped, block elements become
      newlines, entities decoded). Several inline text parts (e.g. text, image, text) are
      joined in order. format=flowed is unwrapped.
    * A forwarded message (message/rfc822 or message/global) is shown in the body as a
      "Forwarded message" block (its From/Date/Subject/To and its text), and kept whole as an
      `.eml` attachment (headers and its own attachments intact). Its own attachments are not
      extracted a second time (no duplicate bytes against the backends' size limits); the block
      names them. Inside multipart/report, the returned message is only an attachment.
    * multipart/report: `report_type` is set (delivery-status, disposition-notification...);
      the human-readable first part is the body, the machine parts are attachments.
    * TNEF (winmail.dat): the files inside become attachments (its text is the body only when
      the mail has no other); winmail.dat itself is kept only when extraction fails: it cannot
      be decoded, is truncated, or yields neither files nor text.
    * Parts with a Content-ID referenced as `cid:` from the HTML are `inline=True`; every other
      part, a Content-ID notwithstanding, is a real attachment. Zero-byte files are kept.
    * File names: RFC 2231 (charset, continuations) and RFC 2047 forms are decoded; paths and
      control characters are removed; nameless parts get `attachment-N.<ext>`.

Limits (so that hostile input costs linear time)
    * `headers` keeps every header in order, each value capped at `MAX_HEADER_VALUE` characters
      (marked "[truncated]"), all together at `MAX_HEADERS_TOTAL`; past that budget only the
      headers classification needs (`_ESSENTIAL_HEADERS`) are kept, each capped at 1 KiB.
      Structured fields (addresses, ids) are read from the full values, each address field
      (all its occurrences together) up to `MAX_ADDRESS_HEADER` characters (~7,000 addresses).
    * Content-Type and Content-Disposition values are cut at 8 KiB (the stdlib's parameter
      parser is quadratic); HTML above `MAX_HTML_PARSE` is converted by a plain tag stripper.
    * `references` keeps the first id (the thread root) and the last `MAX_REFERENCES - 1`.
    * At most `MAX_PARTS` MIME parts are examined; at most `MAX_DEFECTS` defects are listed.
    * A flood of parts costs the stdlib ~15 µs and ~300 bytes each: past `MAX_BOUNDARY_LINES`
      lines that look like boundaries ("--" and a non-blank), the rest of the message is not
      parsed but kept as the attachment `unparsed-remainder.txt`.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html as html_module
import io
import mimetypes
import re
import struct
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from email import errors as email_errors
from email.feedparser import BytesFeedParser
from email.generator import BytesGenerator
from email.message import Message
from email.policy import compat32
from html.parser import HTMLParser
from typing import Any

from mailparser.utils import get_addresses
from tnefparse import TNEF

from gateway.errors import ParseError
from gateway.models import Attachment, ParsedMail, RawSource

__all__ = [
    "MAX_DEPTH",
    "MAX_HEADERS_TOTAL",
    "MAX_HEADER_VALUE",
    "decode_bytes",
    "decode_words",
    "extract_message_id",
    "html_to_text",
    "parse",
]

MAX_DEPTH = 32  # MIME nesting levels decoded; deeper structure is kept undecoded
MAX_PARTS = 2000  # MIME parts examined
MAX_HEADER_VALUE = 32 * 1024  # characters kept per header value in `headers`
MAX_HEADERS_TOTAL = 256 * 1024  # characters kept in `headers` altogether
MAX_ADDRESS_HEADER = 256 * 1024  # characters of one address field (all occurrences) parsed
MAX_REFERENCES = 100
MAX_DEFECTS = 40
MAX_HTML_PARSE = 1024 * 1024  # larger HTML is converted by a fast tag stripper instead
MAX_BOUNDARY_LINES = 10_000  # "--x" lines parsed as MIME; the rest is kept raw (part floods)
_FEED_CHUNK = 1024 * 1024
_ESSENTIAL_CAP = 1024

# Headers always kept in `headers`, even past the budget: classification and rules need them.
_ESSENTIAL_HEADERS = frozenset(
    {
        "from", "to", "cc", "reply-to", "sender", "subject", "date", "message-id",
        "in-reply-to", "references", "return-path", "content-type", "mime-version",
        "auto-submitted", "precedence", "list-id", "list-unsubscribe", "x-autoreply",
        "x-autorespond", "x-auto-response-suppress", "x-autogenerated", "x-priority",
        "importance",
    }
)  # fmt: skip

_FLATTENED_TYPE = "application/x-gateway-nested-mime"
_FLATTENED_HEADER = "X-Gateway-Original-Content-Type"
_PARAM_HEADER_CAP = (
    16 * 1024
)  # Content-Type/-Disposition beyond this: stdlib param parsing is quadratic
_TNEF_SIGNATURE = b"\x78\x9f\x3e\x22"
_TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})


# --------------------------------------------------------------------------------------------
# Defects


class _Defects:
    """Ordered, de-duplicated, capped list of repair notes."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._seen: set[str] = set()
        self.dropped = 0

    def add(self, note: str) -> None:
        if note in self._seen:
            return
        if len(self.items) >= MAX_DEFECTS:
            self.dropped += 1
            return
        self._seen.add(note)
        self.items.append(note)

    def result(self) -> tuple[str, ...]:
        if self.dropped:
            return (*self.items, f"{self.dropped} more defects not listed")
        return tuple(self.items)


# --------------------------------------------------------------------------------------------
# Charsets


def _c1_fallback(err: UnicodeError) -> tuple[str, int]:
    """cp1252 leaves five bytes undefined; map them as ISO-8859-1 does (as browsers do)."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    return err.object[err.start : err.end].decode("latin-1"), err.end


codecs.register_error("gateway.c1", _c1_fallback)

_LATIN1_LABELS = frozenset(
    {"iso-8859-1", "iso8859-1", "iso_8859-1", "iso_8859-1:1987", "latin1", "latin-1", "l1",
     "iso-ir-100", "cp819", "ibm819", "csisolatin1", "8859-1", "iso8859_1", "windows-1252",
     "cp1252", "x-cp1252"}
)  # fmt: skip
_ASCII_LABELS = frozenset(
    {"us-ascii", "ascii", "ansi_x3.4-1968", "iso646-us", "us", "646", "csascii", "iso-ir-6",
     "", "unknown-8bit", "x-unknown", "unknown", "x-user-defined", "default", "charset",
     "none", "8bit", "7bit", "binary", "text/plain", "us-ascii;"}
)  # fmt: skip
_ISO2022JP = ("iso2022_jp", "iso2022_jp_ext", "iso2022_jp_2", "iso2022_jp_2004", "iso2022_jp_3")
_SJIS = ("cp932", "shift_jis_2004")
_GB = ("gb18030",)
_BIG5 = ("big5hkscs", "cp950")
_KR = ("cp949",)
_CHAINS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("iso-2022-jp", "iso2022jp", "csiso2022jp", "iso-2022-jp-1", "iso-2022-jp-2",
                     "iso-2022-jp-3", "iso-2022-jp-2004", "cp50220", "cp50221", "cp50222"),
                    _ISO2022JP),
    **dict.fromkeys(("shift_jis", "shift-jis", "sjis", "x-sjis", "ms_kanji", "windows-31j",
                     "csshiftjis", "cp932", "ms932"), _SJIS),
    **dict.fromkeys(("euc-jp", "eucjp", "x-euc-jp", "cseucpkdfmtjapanese"),
                    ("euc_jp", "euc_jis_2004")),
    **dict.fromkeys(("gb2312", "gbk", "x-gbk", "cp936", "euc-cn", "csgb2312", "gb_2312-80",
                     "chinese", "gb18030", "x-euc-cn"), _GB),
    **dict.fromkeys(("big5", "big5-hkscs", "cn-big5", "x-x-big5", "csbig5", "cp950"), _BIG5),
    **dict.fromkeys(("ks_c_5601-1987", "ks_c_5601", "euc-kr", "korean", "ksc5601", "ksc_5601",
                     "csksc56011987", "cseuckr", "cp949", "windows-949"), _KR),
    **dict.fromkeys(("tis-620", "iso-8859-11", "windows-874", "cp874", "x-windows-874"),
                    ("cp874",)),
    **dict.fromkeys(("iso-8859-8-i", "iso-8859-8-e", "csiso88598i"), ("iso8859_8",)),
    **dict.fromkeys(("iso-8859-6-i", "iso-8859-6-e"), ("iso8859_6",)),
    **dict.fromkeys(("iso-8859-9", "iso8859-9", "latin5", "l5", "windows-1254"), ("cp1254",)),
    **dict.fromkeys(("unicode-1-1-utf-7", "utf-7", "csunicode11utf7"), ("utf_7",)),
    **dict.fromkeys(("x-mac-roman", "macintosh", "mac", "csmacintosh"), ("mac_roman",)),
    **dict.fromkeys(("unicode", "ucs-2", "utf-16"), ("utf_16",)),
    **dict.fromkeys(("utf8", "utf-8", "x-utf-8", "unicode-1-1-utf-8", "unicode-2-0-utf-8"),
                    ("utf_8",)),
}  # fmt: skip
# Codecs Python knows but that must never decode mail text.
_FORBIDDEN_CODECS = frozenset(
    {"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined", "mbcs", "oem",
     "palmos", "utf-8-sig", "unicode_internal"}
)  # fmt: skip
# Codecs whose output may contain lone surrogates (not Unicode text; breaks UTF-8 sinks).
_SURROGATE_PRONE = frozenset({"utf-7", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
                              "utf-32-le", "utf-32-be"})  # fmt: skip
_SURROGATES = re.compile("[\ud800-\udfff]")
_UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xf4][\x80-\xbf]")
_codec_cache: dict[str, str | None] = {}


def _codec(label: str) -> str | None:
    """Python codec name for a charset label, or None when unknown or unusable."""
    try:
        return _codec_cache[label]
    except KeyError:
        pass
    name: str | None
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError, TypeError):
        name = None
    else:
        name = info.name
        if name in _FORBIDDEN_CODECS or not getattr(info, "_is_text_encoding", True):
            name = None
    if len(_codec_cache) < 512:
        _codec_cache[label] = name
    return name


def _norm_label(label: str | None) -> str | None:
    if label is None:
        return None
    return label.strip().strip("\"'").strip().lower()


def _decode_cp1252(data: bytes) -> str:
    return data.decode("cp1252", "gateway.c1")


def _decode_guess(data: bytes) -> tuple[str, str]:
    """8-bit data without a usable label: UTF-8 when valid, else Windows-1252."""
    try:
        return data.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError:
        return _decode_cp1252(data), "windows-1252"


def decode_bytes(data: bytes, label: str | None) -> tuple[str, str | None]:
    """Decode text `data` declared as charset `label`; never raises.

    Returns the text and, when the declaration could not be followed, a short note saying how
    the text was decoded instead.
    """
    if not data:
        return "", None
    lab = _norm_label(label)
    if lab is None or lab in _ASCII_LABELS:
        if data.isascii():
            return data.decode("ascii"), None
        text, how = _decode_guess(data)
        what = "no charset" if lab is None else f"charset {label!r}"
        return text, f"{what} but 8-bit data: decoded as {how}"
    if lab in _LATIN1_LABELS:
        if data.isascii():
            return data.decode("ascii"), None
        if lab not in ("windows-1252", "cp1252", "x-cp1252") and _UTF8_MULTIBYTE.search(data):
            try:
                return data.decode("utf-8"), f"charset {label!r} but the data is UTF-8"
            except UnicodeDecodeError:
                pass
        return _decode_cp1252(data), None
    chain = _CHAINS.get(lab)
    if chain is None:
        codec = _codec(lab)
        if codec is None:
            text = data.decode("utf-8", "replace")
            return text, f"unknown charset {label!r}: decoded as UTF-8"
        chain = (codec,)
    if chain[0] == "utf_8":
        try:
            return data.decode("utf-8"), None
        except UnicodeDecodeError:
            if not _UTF8_MULTIBYTE.search(data):
                # No valid multi-byte sequence at all: legacy 8-bit text mislabelled as UTF-8.
                return _decode_cp1252(
                    data
                ), f"charset {label!r} but not UTF-8: decoded as windows-1252"
            return data.decode("utf-8", "replace"), f"invalid UTF-8 replaced (charset {label!r})"
    for codec in chain:
        try:
            text = data.decode(codec)
        except (UnicodeError, LookupError):
            continue
        if codec in _SURROGATE_PRONE or _codec(codec) in _SURROGATE_PRONE:
            text = _SURROGATES.sub("\ufffd", text)
        return text, None
    try:
        text = data.decode(chain[0], "replace")
    except (UnicodeError, LookupError):
        return data.decode("utf-8", "replace"), f"charset {label!r} failed: decoded as UTF-8"
    return _SURROGATES.sub("\ufffd", text), f"invalid {label!r} data replaced"


def _from_8bit(value: str, defects: _Defects | None, where: str) -> str:
    """Header text from the byte parser (8-bit bytes arrive as surrogate escapes) to Unicode."""
    if value.isascii():
        return value
    data = value.encode("utf-8", "surrogateescape")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        if defects is not None:
            defects.add(f"8-bit {where} is not UTF-8: decoded as windows-1252")
        return _decode_cp1252(data)


# --------------------------------------------------------------------------------------------
# Header values

# An encoded word whose encoded text was split by folding (folding inside a word is illegal).
_EW_ANY = re.compile(r"(=\?[^?\s]+\?[bBqQ]\?)([^?]*)(\?=)")
_FOLD = re.compile(r"\r?\n(?=[ \t])")
_EW = re.compile(r"=\?([^?\s]+)\?([bBqQ])\?([^?]*)\?=")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_B64_JUNK = re.compile(r"[^A-Za-z0-9+/]")
_FOLD_IN_WORD = re.compile(r"\r?\n[ \t]*")


def _rejoin_word(m: re.Match[str]) -> str:
    inner = m.group(2)
    if "\n" not in inner:
        return m.group(0)
    return m.group(1) + _FOLD_IN_WORD.sub("", inner) + m.group(3)


def _unfold(value: str) -> str:
    if "\n" not in value:
        return value
    if "=?" in value:
        value = _EW_ANY.sub(_rejoin_word, value)
    return _FOLD.sub("", value)


def _word_bytes(encoding: str, text: str) -> bytes | None:
    try:
        if encoding in "bB":
            clean = _B64_JUNK.sub("", text)
            if len(clean) % 4 == 1:
                clean = clean[:-1]
            return base64.b64decode(clean + "=" * (-len(clean) % 4))
        return binascii.a2b_qp(text.encode("utf-8", "surrogateescape"), header=True)
    except (binascii.Error, ValueError):
        return None


def decode_words(value: str, defects: _Defects | None = None) -> str:
    """Decode RFC 2047 encoded words in an unfolded header value; never raises."""
    if "=?" not in value:
        return value
    out: list[str] = []
    pending: list[tuple[str, bytearray]] = []  # adjacent words, merged per charset

    def flush() -> None:
        for charset, data in pending:
            text, note = decode_bytes(bytes(data), charset)
            if note and defects is not None:
                defects.add(f"encoded word: {note}")
            out.append(text)
        pending.clear()

    pos = 0
    for m in _EW.finditer(value):
        data = _word_bytes(m.group(2), m.group(3))
        if data is None:
            continue  # undecodable: stays literal text
        between = value[pos : m.start()]
        if not (pending and not between.strip(" \t")):
            flush()
            out.append(between)
        charset = m.group(1).split("*", 1)[0]
        if pending and pending[-1][0].lower() == charset.lower():
            pending[-1][1].extend(data)
        else:
            pending.append((charset, bytearray(data)))
        pos = m.end()
    flush()
    out.append(value[pos:])
    return "".join(out)


def _clean(value: str) -> str:
    """No control characters (CR/LF included) survive into a decoded header value."""
    return _CONTROL.sub(" ", value).strip()


def _decoded_header(raw: str, defects: _Defects | None, name: str) -> str:
    return _clean(decode_words(_unfold(_from_8bit(raw, defects, f"header {name}")), defects))


_MSGID = re.compile(r"<([^<>]*)>")


def _first_msgid(value: str) -> str:
    m = _MSGID.search(value)
    if m:
        return "".join(m.group(1).split())[:998]
    tokens = value.split()
    return tokens[0].strip("<>")[:998] if tokens else ""


def _msgids(value: str) -> list[str]:
    ids = ["".join(x.split()) for x in _MSGID.findall(value)]
    if not ids:
        ids = [t.strip("<>") for t in value.split() if "@" in t]
    return [i[:998] for i in ids if i]


def _dedupe(items: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item and item not in seen:
            seen.add(item)
            out.append(item)
    return out


# --------------------------------------------------------------------------------------------
# Reading the bytes

_HEADER_LINE = re.compile(rb"(?:From |[\x21-\x39\x3b-\x7e]+[ \t]*:)")
_HEADER_BLOCK = re.compile(rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*:|[ \t])[^\n]*(?:\n|\Z))*")
_BLANK_LINE = re.compile(rb"[ \t]*\r?\n")
_BOUNDARY_LIKE = re.compile(rb"^--\S", re.M)


def _flood_cut(raw: bytes, start: int) -> int | None:
    """Offset of the first boundary-like line past `MAX_BOUNDARY_LINES`, or None."""
    for count, m in enumerate(_BOUNDARY_LIKE.finditer(raw, start), 1):
        if count > MAX_BOUNDARY_LINES:
            return m.start()
    return None


def _start_of_message(raw: bytes, defects: _Defects | None) -> int:
    """Offset where the message starts; ParseError for what cannot be read as mail at all."""
    if not raw or raw.isspace():  # isspace: no copy of a large message
        raise ParseError("empty message: no bytes besides white space")
    pos = 0
    if raw.startswith(b"\xef\xbb\xbf"):
        pos = 3
        if defects is not None:
            defects.add("leading UTF-8 byte order mark removed")
    skipped = False
    while True:
        m = _BLANK_LINE.match(raw, pos)
        if not m:
            break
        pos = m.end()
        skipped = True
    if skipped and defects is not None:
        defects.add("blank lines before the header section removed")
    if not _HEADER_LINE.match(raw, pos):
        head = raw[pos : pos + 4096]
        controls = sum(1 for b in head if b < 32 and b not in (9, 10, 13))
        if b"\x00" in head or controls * 10 > len(head):
            raise ParseError("no header section and the content is not text (binary data)")
        if defects is not None:
            defects.add("no header section: the whole input is the body")
    return pos


class HeaderValueCutDefect(email_errors.HeaderDefect):
    """A Content-Type or Content-Disposition value was cut to `_PARAM_HEADER_CAP` characters."""


class _BoundedParser(BytesFeedParser):
    """The stdlib feed parser, with nesting bounded and parameter headers capped.

    Hooks `_parse_headers`, which the stdlib calls once per (sub)message right after reading its
    header lines, with the message being built as `_cur` and the open messages in `_msgstack`.
    A message at the depth limit that would nest further is re-typed so that the stdlib reads its
    body as one opaque payload; the original type is kept in `_FLATTENED_HEADER` (and put back
    whenever the part is serialised, see `_Walker.as_bytes`).
    """

    def __init__(self, base_depth: int) -> None:
        super().__init__(policy=compat32)
        self.base_depth = base_depth

    def _parse_headers(self, lines: list[str]) -> None:
        getattr(super(), "_parse_headers")(lines)  # noqa: B009 (private hook, not in the stubs)
        cur: Message = getattr(self, "_cur")  # noqa: B009
        for name in ("content-type", "content-disposition"):
            value = cur.get(name)
            if isinstance(value, str) and len(value) > _PARAM_HEADER_CAP:
                cur.replace_header(name, value[:_PARAM_HEADER_CAP])
                cur.defects.append(HeaderValueCutDefect())
        depth = self.base_depth + len(getattr(self, "_msgstack"))  # noqa: B009
        if depth > MAX_DEPTH and cur.get_content_maintype() in ("multipart", "message"):
            original = str(cur.get("content-type") or cur.get_default_type())
            if "content-type" in cur:
                cur.replace_header("content-type", _FLATTENED_TYPE)
            else:
                cur["Content-Type"] = _FLATTENED_TYPE
            cur[_FLATTENED_HEADER] = original


_B64_TEXT = re.compile(r"[A-Za-z0-9+/=\r\n \t]*")
_DROP_DECODED_MIN = 64 * 1024


def _fast_base64(part: Message) -> bytes | None:
    """The decoded bytes of a clean base64 part, or None to let the email package decode it.

    The email package joins the payload's lines into a copy and decodes that: for a big
    attachment, two more copies. Clean base64 (only the alphabet and line breaks, whole groups
    of four) decodes the same way straight from the text; anything else keeps the email
    package's lenient handling and its defect notes.
    """
    if str(part.get("content-transfer-encoding", "")).strip().lower() != "base64":
        return None
    payload = part.get_payload()
    if not isinstance(payload, str) or len(payload) < _DROP_DECODED_MIN:
        return None
    if not payload.isascii() or _B64_TEXT.fullmatch(payload) is None:
        return None
    white = payload.count("\n") + payload.count("\r") + payload.count(" ") + payload.count("\t")
    if (len(payload) - white) % 4:
        return None
    try:
        return binascii.a2b_base64(payload, strict_mode=False)
    except (binascii.Error, ValueError):
        return None


def _parse_bytes(data: bytes | memoryview | Iterable[bytes], base_depth: int) -> Message:
    parser = _BoundedParser(base_depth)
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for start in range(0, len(view), _FEED_CHUNK):
            parser.feed(bytes(view[start : start + _FEED_CHUNK]))
    else:
        for chunk in data:
            parser.feed(chunk)
    msg = parser.close()
    assert isinstance(msg, Message)
    return msg


def _parse_headers_only(data: bytes | memoryview) -> Message:
    parser = BytesFeedParser(policy=compat32)
    getattr(parser, "_set_headersonly")()  # noqa: B009 (what BytesHeaderParser does)
    parser.feed(bytes(data))
    msg = parser.close()
    assert isinstance(msg, Message)
    return msg


# --------------------------------------------------------------------------------------------
# HTML to text

_WS = re.compile(r"\s+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_TAG = re.compile(r"<[^>]*>")
_SKIP_BLOCK = re.compile(r"<(script|style|head|title)\b.*?</\1\s*>", re.S | re.I)


class _HTMLToText(HTMLParser):
    _BLOCK = frozenset(
        {"p", "div", "tr", "table", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4",
         "h5", "h6", "blockquote", "pre", "hr", "section", "article", "header", "footer",
         "address", "center", "form", "fieldset", "figure", "figcaption", "main", "nav",
         "aside", "tbody", "thead", "tfoot", "caption", "body", "details", "summary"}
    )  # fmt: skip
    _PARAGRAPH = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "table", "ul",
                            "ol", "pre", "hr"})  # fmt: skip
    _SKIP = frozenset({"script", "style", "template", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._out: list[str] = []
        self._newlines = 2  # trailing newlines in the output (2 = start of text)
        self._space = True
        self._skip = 0
        self._head = False
        self._pre = 0
        self._links: list[tuple[str, int]] = []

    def _emit(self, text: str) -> None:
        if not text:
            return
        self._out.append(text)
        stripped = text.rstrip("\n")
        if stripped:
            self._newlines = len(text) - len(stripped)
        else:
            self._newlines += len(text)
        self._space = text[-1].isspace()

    def _break(self, count: int) -> None:
        if self._newlines < count:
            self._emit("\n" * (count - self._newlines))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip += 1
            return
        if tag == "head":
            self._head = True
            return
        if tag == "body":
            self._head = False
        if self._skip or self._head:
            return
        if tag == "br":
            self._emit("\n")
        elif tag == "li":
            self._break(1)
            self._emit("- ")
            self._space = True
        elif tag in ("td", "th"):
            if not self._space:
                self._emit(" ")
        elif tag in self._BLOCK:
            self._break(2 if tag in self._PARAGRAPH else 1)
            if tag == "pre":
                self._pre += 1
            elif tag == "hr":
                self._emit("----------\n")
        elif tag == "a" and len(self._links) < 32:  # bounded: a label is joined at </a>
            href = next((v for k, v in attrs if k == "href" and v), "")
            self._links.append((href.strip(), len(self._out)))

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
            return
        if tag == "head":
            self._head = False
            return
        if self._skip or self._head:
            return
        if tag == "a" and self._links:
            href, start = self._links.pop()
            label = "".join(self._out[start : start + 64]).strip()
            if _show_url(href, label) and not label.endswith(f"({href})"):
                self._emit(f" ({href})")
        elif tag in self._BLOCK:
            if tag == "pre":
                self._pre = max(0, self._pre - 1)
            self._break(2 if tag in self._PARAGRAPH else 1)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "hr", "img"):
            self.handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        if self._skip or self._head or not data:
            return
        if self._pre:
            self._emit(data)
            return
        text = _WS.sub(" ", data)
        if self._space or self._newlines:
            text = text.lstrip(" ")
        self._emit(text)

    def text(self) -> str:
        out = "".join(self._out)
        out = _TRAILING_SPACE.sub("\n", out)
        return _MANY_NEWLINES.sub("\n\n", out).strip()


def _show_url(href: str, label: str) -> bool:
    if not href or not label:
        return False
    low = href.lower()
    if low.startswith(("#", "javascript:", "data:", "cid:", "about:")):
        return False

    def norm(s: str) -> str:
        s = s.strip().lower()
        for prefix in ("mailto:", "https://", "http://", "tel:"):
            if s.startswith(prefix):
                s = s[len(prefix) :]
        return s.rstrip("/")

    return norm(href) != norm(label)


def html_to_text(html: str) -> str:
    """Readable text from HTML: links as "text (url)", no scripts/styles, blocks on new lines."""
    if not html:
        return ""
    if len(html) <= MAX_HTML_PARSE:
        parser = _HTMLToText()
        try:
            parser.feed(html)
            parser.close()
            return parser.text()
        except Exception:  # html.parser has asserted on odd markup before
            pass
    text = _TAG.sub(" ", _SKIP_BLOCK.sub(" ", html))
    text = html_module.unescape(text)
    lines = (" ".join(line.split()) for line in text.splitlines())
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()


# --------------------------------------------------------------------------------------------
# Text helpers

_FLOWED_SIG = "-- "


def _unflow(text: str, delsp: bool) -> str:
    """RFC 3676 format=flowed: join soft line breaks (a line ending in a space)."""
    out: list[str] = []
    buf: list[str] = []
    buf_depth = -1

    def flush(depth: int) -> None:
        joined = "".join(buf)
        out.append(">" * depth + (" " if depth > 0 and joined else "") + joined)
        buf.clear()

    for line in text.split("\n"):
        depth = len(line) - len(line.lstrip(">"))
        content = line[depth:]
        if content.startswith(" "):
            content = content[1:]  # space-stuffing
        if buf and depth != buf_depth:
            flush(buf_depth)
        if content.endswith(" ") and content != _FLOWED_SIG:
            buf.append(content[:-1] if delsp else content)
            buf_depth = depth
            continue
        buf.append(content)
        flush(depth)
        buf_depth = -1
    if buf:
        flush(max(buf_depth, 0))
    return "\n".join(out)


def _newlines(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


_META_CHARSET = re.compile(
    rb"""<meta[^>]{0,200}?charset\s*=\s*["']?\s*([A-Za-z0-9_:.-]{1,40})""", re.I
)
_CID = re.compile(r"""cid:([^\s"'<>)\\]+)""", re.I)
_BAD_NAME = re.compile(r"[\x00-\x1f\x7f]")


def _safe_filename(name: str) -> str:
    """A file name without directories or control characters; "" when nothing is left."""
    name = _BAD_NAME.sub("", name).replace("\\", "/").rsplit("/", 1)[-1].strip()
    if not name.strip("."):
        return ""
    if len(name) > 200:
        stem, dot, ext = name.rpartition(".")
        name = (stem[: 200 - len(ext) - 1] + "." + ext) if dot and len(ext) <= 16 else name[:200]
    return name


_EXTENSIONS = {
    "text/plain": ".txt",
    "text/html": ".html",
    "message/rfc822": ".eml",
    "message/global": ".eml",
    "text/calendar": ".ics",
    "application/octet-stream": ".bin",
    "text/rfc822-headers": ".txt",
    "message/delivery-status": ".txt",
    "message/disposition-notification": ".txt",
    "image/jpeg": ".jpg",
}


def _extension(ctype: str) -> str:
    ext = _EXTENSIONS.get(ctype)
    if ext is None:
        ext = mimetypes.guess_extension(ctype, strict=False) or ".bin"
    return ext


def _guess_type(filename: str) -> str:
    return mimetypes.guess_type(filename, strict=False)[0] or "application/octet-stream"


# --------------------------------------------------------------------------------------------
# The MIME walk


@dataclass
class _Segment:
    """One piece of the body in reading order: plain text, HTML, or both (alternatives)."""

    plain: str | None = None
    html: str | None = None
    fallback: bool = False  # used only when no other segment has text (e.g. a TNEF body)

    def has_text(self) -> bool:
        return bool((self.plain and self.plain.strip()) or (self.html and self.html.strip()))


@dataclass
class _Part:
    filename: str
    content_type: str
    data: bytes
    content_id: str = ""


def _segments_text(segments: list[_Segment]) -> str:
    primary = [s for s in segments if not s.fallback]
    chosen = primary if any(s.has_text() for s in primary) else segments
    pieces = []
    for seg in chosen:
        if seg.plain is not None and seg.plain.strip():
            pieces.append(seg.plain.strip("\n"))
        elif seg.html:
            text = html_to_text(seg.html)
            if text:
                pieces.append(text)
    return "\n\n".join(pieces)


@dataclass
class _Walker:
    defects: _Defects
    linesep: str = "\n"
    attachments: list[_Part] = field(default_factory=list)
    html_seen: list[str] = field(default_factory=list)
    report_type: str = ""
    parts: int = 0
    unnamed: int = 0
    in_forward: int = 0

    # -- helpers -----------------------------------------------------------------------------

    def note(self, text: str, path: str) -> None:
        self.defects.add(f"{text} (part {path or 'top'})")

    def collect_defects(self, part: Message, path: str) -> None:
        for defect in part.defects:
            self.note(type(defect).__name__, path)

    def header(self, part: Message, name: str) -> str:
        value = part.get(name)
        if value is None:
            return ""
        return _decoded_header(str(value), self.defects, name)

    def payload(self, part: Message, path: str) -> bytes:
        """The decoded payload bytes of a leaf part; lenient about the transfer encoding."""
        cte_raw = part.get("content-transfer-encoding")
        if cte_raw is not None:
            cte = str(cte_raw).strip().strip("\"'").strip().lower()
            if cte != str(cte_raw).lower():
                part.replace_header("content-transfer-encoding", cte)
            if cte not in ("7bit", "8bit", "binary", "base64", "quoted-printable", "x-uuencode",
                           "uuencode", "uue", "x-uue", ""):  # fmt: skip
                self.note(f"unknown transfer encoding {cte[:40]!r}: payload taken as is", path)
        fast = _fast_base64(part)
        if fast is not None:
            return fast
        try:
            data = part.get_payload(decode=True)
        except Exception as exc:  # keep the bytes whatever the decoder thinks
            self.note(f"payload not decodable ({type(exc).__name__}): kept as is", path)
            raw = part.get_payload()
            data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else b""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        return data if isinstance(data, bytes) else b""

    def filename(self, part: Message) -> str:
        value: Any = None
        try:
            value = part.get_param("filename", None, "content-disposition")
            if not value:
                value = part.get_param("name", None, "content-type")
        except Exception:  # compat32 param parsing on hostile headers
            value = None
        if not value:
            return ""
        if isinstance(value, tuple):  # RFC 2231: (charset, language, %-decoded latin-1 text)
            charset, _lang, text = value
            data = str(text).encode("latin-1", "surrogateescape") if text else b""
            name, note = decode_bytes(data, charset or None)
            if note:
                self.defects.add(f"file name: {note}")
        else:
            name = str(value)
            if name.startswith('"') and name.endswith('"') and len(name) > 1:
                name = name[1:-1]
            name = decode_words(_from_8bit(name, self.defects, "file name"), self.defects)
        return _safe_filename(name)

    def generated_name(self, ctype: str) -> str:
        self.unnamed += 1
        return f"attachment-{self.unnamed}{_extension(ctype)}"

    def as_bytes(self, msg: Message, path: str) -> bytes:
        """The part as bytes again (for .eml attachments), with flattened parts restored."""
        flattened = _flattened_parts(msg)
        for part in flattened:
            part.replace_header("content-type", str(part[_FLATTENED_HEADER]))
            del part[_FLATTENED_HEADER]
        buf = io.BytesIO()
        try:
            gen = BytesGenerator(
                buf, mangle_from_=False, policy=compat32.clone(linesep=self.linesep)
            )
            gen.flatten(msg)
            return buf.getvalue()
        except Exception as exc:  # includes RecursionError on odd structures
            self.note(f"part could not be re-serialised ({type(exc).__name__})", path)
            head = "".join(f"{k}: {v}{self.linesep}" for k, v in msg.raw_items())
            body = msg.get_payload()
            tail = body if isinstance(body, str) else ""
            return (head + self.linesep + tail).encode("utf-8", "surrogateescape")
        finally:
            for part in flattened:
                original = str(part.get("content-type", ""))
                part.replace_header("content-type", _FLATTENED_TYPE)
                part[_FLATTENED_HEADER] = original

    def decode_text(self, part: Message, data: bytes, path: str, html: bool) -> str:
        try:
            label = part.get_content_charset()
        except Exception:
            label = None
        if label is None and html:
            m = _META_CHARSET.search(data[:4096])
            if m:
                label = m.group(1).decode("ascii").lower()
        text, note = decode_bytes(data, label)
        if note:
            self.note(note, path)
        return _newlines(text)

    # -- the walk ----------------------------------------------------------------------------

    def walk(
        self, part: Message, depth: int, path: str, as_attachment: bool = False
    ) -> list[_Segment]:
        self.parts += 1
        if self.parts > MAX_PARTS:
            if self.parts == MAX_PARTS + 1:
                self.defects.add(f"more than {MAX_PARTS} MIME parts: the rest were not examined")
            return []
        try:
            segments = self._walk(part, depth, path, as_attachment)
        except Exception as exc:  # one bad part must not lose the others
            self.note(
                f"part could not be decoded ({type(exc).__name__}: {str(exc)[:80]}); kept raw", path
            )
            self.attachments.append(
                _Part(self.generated_name("message/rfc822"), "application/octet-stream",
                      self.as_bytes(part, path))
            )  # fmt: skip
            segments = []
        self.collect_defects(part, path)
        return segments

    def _walk(self, part: Message, depth: int, path: str, as_attachment: bool) -> list[_Segment]:
        ctype = part.get_content_type()
        maintype, _, subtype = ctype.partition("/")
        if ctype == _FLATTENED_TYPE:
            original = str(part.get(_FLATTENED_HEADER, "multipart/mixed"))
            self.note(
                f"MIME nesting deeper than {MAX_DEPTH} levels: inner parts kept undecoded", path
            )
            data = self.payload(part, path)
            head = f"Content-Type: {original}{self.linesep}{self.linesep}"
            eml = head.encode("utf-8", "surrogateescape") + data
            self.attachments.append(
                _Part(f"nested-parts-{path or 'top'}.eml", "message/rfc822", eml)
            )
            return []
        if part.is_multipart():
            children = [c for c in part.get_payload() if isinstance(c, Message)]
            if maintype == "message":
                return self.message_part(part, children, subtype, depth, path, as_attachment)
            return self.multipart(part, children, subtype, depth, path, as_attachment)
        if maintype == "multipart":
            return self.repair_multipart(part, ctype, depth, path, as_attachment)
        return self.leaf(part, ctype, path, as_attachment)

    def multipart(self, part: Message, children: list[Message], subtype: str, depth: int,
                  path: str, as_attachment: bool) -> list[_Segment]:  # fmt: skip
        def child_path(i: int) -> str:
            return f"{path}.{i + 1}" if path else str(i + 1)

        if subtype == "alternative":
            # text/plain for `text`, the last (richest) HTML alternative for `html`
            plain: str | None = None
            html: str | None = None
            for i, c in enumerate(children):
                segs = self.walk(c, depth + 1, child_path(i), as_attachment)
                htmls = [s.html for s in segs if s.html and s.html.strip()]
                if htmls:
                    html = "\n".join(htmls)
                elif plain is None:
                    text = _segments_text(segs)
                    if text.strip():
                        plain = text
            return [_Segment(plain=plain, html=html)] if (plain or html) else []
        if subtype == "related" and children:
            root = 0
            start = part.get_param("start")
            if isinstance(start, str):
                wanted = start.strip().strip("<>")
                for i, c in enumerate(children):
                    if str(c.get("content-id", "")).strip().strip("<>") == wanted:
                        root = i
                        break
            out: list[_Segment] = []
            for i, c in enumerate(children):
                segs = self.walk(c, depth + 1, child_path(i), as_attachment or i != root)
                if i == root:
                    out = segs
            return out
        if subtype == "report":
            if not self.in_forward and not self.report_type:
                self.report_type = _report_type(part, children)
            out = []
            for i, c in enumerate(children):
                out.extend(self.walk(c, depth + 1, child_path(i), as_attachment or i > 0))
            return out
        if subtype == "signed":
            out = []
            for i, c in enumerate(children):
                out.extend(self.walk(c, depth + 1, child_path(i), as_attachment or i > 0))
            return out
        if subtype == "encrypted":
            self.note("encrypted message: content kept as attachments, not readable", path)
            for i, c in enumerate(children):
                self.walk(c, depth + 1, child_path(i), True)
            return []
        out = []
        for i, c in enumerate(children):
            out.extend(self.walk(c, depth + 1, child_path(i), as_attachment))
        return out

    def repair_multipart(self, part: Message, ctype: str, depth: int, path: str,
                         as_attachment: bool) -> list[_Segment]:  # fmt: skip
        body = part.get_payload()
        text = body if isinstance(body, str) else ""
        declared = part.get_boundary()
        guess = _guess_boundary(text)
        if guess and guess != declared and '"' not in guess:
            self.note("multipart boundary missing or not found: boundary taken from the body", path)
            data = (f'Content-Type: {ctype}; boundary="{guess}"\n\n').encode() + text.encode(
                "utf-8", "surrogateescape"
            )
            sub = _parse_bytes(data, depth - 1)
            if sub.is_multipart():
                children = [c for c in sub.get_payload() if isinstance(c, Message)]
                self.collect_defects(sub, path)
                # the original part still answers for the other parameters (report-type...)
                return self.multipart(
                    part, children, ctype.partition("/")[2], depth, path, as_attachment
                )
        self.note("multipart without usable boundary: body kept as text", path)
        data = text.encode("utf-8", "surrogateescape")
        if as_attachment:
            self.attachments.append(_Part(self.generated_name("text/plain"), "text/plain", data))
            return []
        decoded, note = decode_bytes(data, None)
        if note:
            self.note(note, path)
        return [_Segment(plain=_newlines(decoded))]

    def message_part(self, part: Message, children: list[Message], subtype: str, depth: int,
                     path: str, as_attachment: bool) -> list[_Segment]:  # fmt: skip
        if subtype in ("delivery-status", "disposition-notification", "global-delivery-status",
                       "global-disposition-notification", "feedback-report"):  # fmt: skip
            blocks = []
            for block in children:
                blocks.append("\n".join(
                    f"{k}: {_clean(_unfold(_from_8bit(str(v), self.defects, 'report field')))}"
                    for k, v in block.raw_items()
                ))  # fmt: skip
                payload = block.get_payload()
                if isinstance(payload, str) and payload.strip():
                    blocks.append(_newlines(_from_8bit(payload, self.defects, "report")).strip())
            data = "\n\n".join(blocks).encode("utf-8") + b"\n"
            self.attachments.append(_Part(f"{subtype}.txt", f"message/{subtype}", data))
            return []
        if not children:
            return []
        inner = children[0]
        cte = str(part.get("content-transfer-encoding", "")).strip().lower()
        if cte in ("base64", "quoted-printable"):
            # Illegal for message/*, but sent: the stdlib read the encoded text as a message.
            self.note(f"message/{subtype} with {cte} transfer encoding decoded", path)
            encoded = self.as_bytes(inner, path)
            tmp = Message()
            tmp["Content-Transfer-Encoding"] = cte
            tmp.set_payload(encoded.decode("ascii", "surrogateescape"))
            decoded = tmp.get_payload(decode=True)
            if isinstance(decoded, bytes):
                inner = _parse_bytes(decoded, depth)
        if subtype not in ("rfc822", "global", "news"):
            name = f"{subtype}-{path or 'top'}.txt"
            self.attachments.append(_Part(name, f"message/{subtype}", self.as_bytes(inner, path)))
            return []
        return self.forward(inner, depth, path, as_attachment, self.filename(part))

    def forward(
        self, inner: Message, depth: int, path: str, as_attachment: bool, filename: str = ""
    ) -> list[_Segment]:
        eml = self.as_bytes(inner, path)
        if not filename:
            subject = self.header(inner, "subject")
            filename = (_safe_filename(subject)[:80].strip() or "forwarded-message") + ".eml"
        self.attachments.append(_Part(filename, "message/rfc822", eml))
        if as_attachment:
            return []
        saved = self.attachments
        self.attachments = []
        self.in_forward += 1
        try:
            segments = self.walk(inner, depth + 1, f"{path}.1" if path else "1")
        finally:
            inner_parts = self.attachments
            self.attachments = saved
            self.in_forward -= 1
        lines = ["---------- Forwarded message ----------"]
        for name in ("From", "Date", "Subject", "To", "Cc"):
            value = self.header(inner, name)
            if value:
                lines.append(f"{name}: {value}")
        block = "\n".join(lines)
        text = _segments_text(segments)
        if text:
            block += "\n\n" + text
        if inner_parts:
            names = ", ".join(p.filename for p in inner_parts)
            block += f"\n\n[Attachments of the forwarded message, in {filename}: {names}]"
        return [_Segment(plain=block)]

    def leaf(self, part: Message, ctype: str, path: str, as_attachment: bool) -> list[_Segment]:
        try:
            disposition = part.get_content_disposition() or ""
        except Exception:
            disposition = ""
        filename = self.filename(part)
        if (
            ctype in ("text/plain", "text/html")
            and not filename
            and disposition != "attachment"
            and not as_attachment
        ):
            data = self.payload(part, path)
            if ctype == "text/html":
                html = self.decode_text(part, data, path, html=True)
                self.html_seen.append(html)
                return [_Segment(html=html)]
            text = self.decode_text(part, data, path, html=False)
            if str(part.get_param("format", "") or "").lower() == "flowed":
                delsp = str(part.get_param("delsp", "") or "").lower() == "yes"
                text = _unflow(text, delsp)
            return [_Segment(plain=text)]
        data = self.payload(part, path)
        if ctype in _TNEF_TYPES or filename.lower() == "winmail.dat":
            if data.startswith(_TNEF_SIGNATURE):
                return self.tnef(data, filename or "winmail.dat", ctype, path)
            if ctype in _TNEF_TYPES:
                self.note("TNEF part without TNEF signature: kept as is", path)
        cid = str(part.get("content-id") or "")
        cid = _from_8bit(cid, self.defects, "Content-ID").strip().strip("<>").strip()
        name = filename or self.generated_name(ctype)
        if ctype == "text/html" and as_attachment:
            html, _note = decode_bytes(data, part.get_content_charset())
            self.html_seen.append(html)
        self.attachments.append(_Part(name, ctype, data, cid))
        if len(data) > _DROP_DECODED_MIN and not self.in_forward:
            # decoded: the encoded text in the tree is not needed any more (a forwarded message
            # was serialised before its parts were walked), and a big mail's memory shrinks as
            # its attachments are decoded instead of holding both
            part.set_payload("")
        return []

    def tnef(self, data: bytes, filename: str, ctype: str, path: str) -> list[_Segment]:
        """Files (and, as a fallback, the text) inside winmail.dat; winmail.dat itself is kept
        when it is damaged or yields neither files nor text, so nothing is lost."""
        try:
            tnef = TNEF(data, do_checksum=False)
            found: list[_Part] = []
            for att in tnef.attachments:
                name = _tnef_name(att)
                payload = att.data if isinstance(att.data, bytes) else bytes(att.data)
                if not name and not payload:
                    continue
                name = _safe_filename(name) or self.generated_name("application/octet-stream")
                found.append(_Part(name, _guess_type(name), payload))
            segments = []
            body = _tnef_text(tnef.body)
            if body.strip():
                segments.append(_Segment(plain=_newlines(body), fallback=True))
            html = _tnef_text(tnef.htmlbody)
            if html.strip():
                segments.append(_Segment(html=html, fallback=True))
        except Exception as exc:  # tnefparse raises anything on bad data
            self.note(f"{filename} not decodable as TNEF ({type(exc).__name__}): kept as is", path)
            self.attachments.append(_Part(filename, ctype, data))
            return []
        self.attachments.extend(found)
        if not _tnef_complete(data):
            self.note(f"{filename} is damaged: kept as is besides what could be extracted", path)
            self.attachments.append(_Part(filename, ctype, data))
        elif not found and not segments:
            self.note(f"{filename} held neither files nor text: kept as is", path)
            self.attachments.append(_Part(filename, ctype, data))
        return segments


def _tnef_complete(data: bytes) -> bool:
    """True when the TNEF attribute chain ends exactly at the end of the data (not truncated)."""
    offset = 6
    while offset < len(data):
        if offset + 11 > len(data):
            return False
        (length,) = struct.unpack_from("<I", data, offset + 5)
        offset += 9 + length + 2
    return offset == len(data)


def _report_type(part: Message, children: list[Message]) -> str:
    """The report-type parameter, or what the machine-readable part says when it is missing."""
    value = part.get_param("report-type")
    if isinstance(value, str) and value.strip():
        return value.strip().strip("\"'").lower()
    for child in children[1:]:
        ctype = child.get_content_type()
        if ctype.startswith("message/") and ctype != "message/rfc822":
            return ctype.partition("/")[2].replace("global-", "")
    return "unknown"


def _flattened_parts(msg: Message) -> list[Message]:
    """Parts re-typed by `_BoundedParser` below `msg` (iterative: the tree may be deep)."""
    found = []
    stack = [msg]
    while stack:
        part = stack.pop()
        if _FLATTENED_HEADER in part:
            found.append(part)
        payload = part.get_payload()
        if isinstance(payload, list):
            stack.extend(p for p in payload if isinstance(p, Message))
    return found


def _tnef_name(att: Any) -> str:
    for getter in (lambda: att.long_filename(), lambda: att.name):
        try:
            value = getter()
        except Exception:
            continue
        if isinstance(value, bytes):
            value, _ = decode_bytes(value.rstrip(b"\x00"), None)
        if isinstance(value, str) and value.strip("\x00 "):
            return value.strip("\x00 ")
    raw = getattr(att, "_name", b"")
    if isinstance(raw, bytes) and raw:
        return decode_bytes(raw.rstrip(b"\x00"), None)[0]
    return ""


def _tnef_text(value: Any) -> str:
    if isinstance(value, bytes):
        return decode_bytes(value.rstrip(b"\x00"), None)[0]
    if isinstance(value, str):
        return _SURROGATES.sub("\ufffd", value.rstrip("\x00"))
    return ""


_BOUNDARY_LINE = re.compile(r"^--([^\s]{1,200}?)(--)?[ \t]*\r?$", re.M)


def _guess_boundary(body: str) -> str | None:
    """A boundary for a multipart whose declared one is missing: a `--token` line seen twice."""
    head = body[: 256 * 1024]
    counts: dict[str, int] = {}
    for m in _BOUNDARY_LINE.finditer(head):
        token = m.group(1)
        if not any(ch.isalnum() for ch in token):
            continue
        counts[token] = counts.get(token, 0) + 1
        if counts[token] >= 2:
            return token
        if len(counts) > 50:
            break
    return None


# --------------------------------------------------------------------------------------------
# Headers and addresses


def _header_index(
    msg: Message, defects: _Defects
) -> tuple[tuple[tuple[str, str], ...], dict[str, list[str]]]:
    """(`headers` for ParsedMail, lower-case name → unfolded 8-bit-decoded raw values)."""
    retained: list[tuple[str, str]] = []
    index: dict[str, list[str]] = {}
    total = 0
    dropped = dropped_chars = 0
    for name, raw_value in msg.raw_items():
        value = str(raw_value)
        low = name.lower()
        unfolded = _unfold(_from_8bit(value, defects, f"header {name}"))
        index.setdefault(low, []).append(unfolded)
        cap = MAX_HEADER_VALUE
        if total >= MAX_HEADERS_TOTAL:
            if low not in _ESSENTIAL_HEADERS:
                dropped += 1
                dropped_chars += len(value)
                continue
            cap = _ESSENTIAL_CAP
        if len(unfolded) > cap:
            if cap == MAX_HEADER_VALUE:
                defects.add(f"header {name} longer than {cap} characters: truncated in headers")
            decoded = _clean(decode_words(unfolded[:cap], defects)) + " [truncated]"
        else:
            decoded = _clean(decode_words(unfolded, defects))
        retained.append((name, decoded))
        total += len(decoded)
    if dropped:
        defects.add(
            f"{dropped} headers ({dropped_chars} characters) not kept: "
            f"header budget of {MAX_HEADERS_TOTAL} characters exceeded"
        )
    return tuple(retained), index


def _addresses(values: list[str], defects: _Defects, name: str) -> list[tuple[str, str]]:
    """(display name, lower-case address) pairs of every occurrence of an address header."""
    out: list[tuple[str, str]] = []
    budget = MAX_ADDRESS_HEADER
    for value in values:
        if len(value) > budget:
            defects.add(f"header {name} longer than {MAX_ADDRESS_HEADER} characters: addresses cut")
            if budget <= 0:
                break
            cut = value.rfind(",", 0, budget)
            value = value[: cut if cut > 0 else budget]
        budget -= len(value)
        diagnostics: list[dict[str, Any]] = []
        try:
            pairs = get_addresses(value, defects=diagnostics, decode_names=True)
        except Exception as exc:  # fall back to the stdlib's parser
            defects.add(f"header {name}: address parser failed ({type(exc).__name__}), stdlib used")
            import email.utils

            pairs = email.utils.getaddresses([value])
        for diag in diagnostics[:3]:
            reason = str(diag.get("reason", "?"))
            if reason != "invalid-display-name":
                defects.add(f"header {name}: {reason}")
        for display, addr in pairs:
            addr = _clean(str(addr)).lower()
            if not addr or "@" not in addr:
                continue
            display = str(display)
            if "=?" in display:
                display = decode_words(display, defects)
            display = _clean(_SURROGATES.sub("\ufffd", display))
            out.append((display, addr))
    return out


def _looks_like_other_address(display: str, addr: str) -> bool:
    return "@" in display and addr not in display.lower()


# --------------------------------------------------------------------------------------------
# Public API


_SOURCE_HEAD = 1 << 20  # what is read first of a RawSource: the header section lives here
_LINESEP_WINDOW = 4096  # the line ends of the message are judged by its first bytes


class _Raw:
    """The message bytes for `parse`: whole `bytes`, or a RawSource read piece by piece."""

    def __init__(self, data: bytes | None, source: RawSource | None) -> None:
        self.data, self.source = data, source
        self.size = len(data) if data is not None else (source.size if source else 0)

    def head(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.source is not None
        return self.source.read(0, min(self.size, _SOURCE_HEAD))

    def whole(self) -> bytes:
        if self.data is None:
            assert self.source is not None
            self.data = self.source.read(0, self.size)
        return self.data

    def get(self, a: int, b: int | None = None) -> bytes:
        b = self.size if b is None else b
        if self.data is not None:
            return self.data[a:b]
        assert self.source is not None
        return self.source.read(a, max(0, b - a))

    def pieces(self, a: int, b: int | None = None) -> Iterator[bytes]:
        b = self.size if b is None else b
        size = _FEED_CHUNK
        for off in range(a, b, size):
            yield self.get(off, min(b, off + size))

    def line_pieces(self, a: int) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) pieces from `a` to the end, each cut after a line end (so that no
        line-anchored match crosses a cut)."""
        carry, carry_at = b"", a
        for off in range(a, self.size, _FEED_CHUNK):
            chunk = carry + self.get(off, min(self.size, off + _FEED_CHUNK))
            nl = chunk.rfind(b"\n")
            if nl < 0 or off + _FEED_CHUNK >= self.size:
                carry = chunk
                continue
            yield carry_at, chunk[: nl + 1]
            carry_at += nl + 1
            carry = chunk[nl + 1 :]
        if carry:
            yield carry_at, carry


def _flood_cut_pieces(raw: _Raw, start: int) -> int | None:
    """`_flood_cut` over a RawSource, piece by piece."""
    count = 0
    # as re's `^` with a start position: no line start at `start` unless a line ends before it
    skip = start if start and raw.get(start - 1, start) != b"\n" else -1
    for at, piece in raw.line_pieces(start):
        for m in _BOUNDARY_LIKE.finditer(piece):
            if at + m.start() == skip:
                continue
            count += 1
            if count > MAX_BOUNDARY_LINES:
                return at + m.start()
    return None


def parse(raw: bytes | bytearray | memoryview | RawSource) -> ParsedMail:
    """Parse raw RFC 5322 bytes into a ParsedMail; repairs go to `defects`.

    `raw` may be a RawSource (the worker passes one for big mails): it is then read in pieces
    and never held whole, unless a repair needs the whole message.

    Raises ParseError only for input that cannot be read as mail at all: empty (or white space
    only), or without a header section and not text either.
    """
    if isinstance(raw, bytes | bytearray | memoryview):
        src = _Raw(raw if isinstance(raw, bytes) else bytes(raw), None)
    else:
        src = _Raw(None, raw)
        if src.size <= _SOURCE_HEAD:
            src.whole()
    defects = _Defects()
    head = src.head()
    if src.data is None and (head.isspace() or not head):
        head = src.whole()  # odd enough to read the whole of it
    start = _start_of_message(head, defects)
    if src.data is None and start + _LINESEP_WINDOW > len(head):
        head = src.whole()  # the message starts beyond the first piece: read it all
        start = _start_of_message(head, _Defects())
    if src.data is not None:
        cut = _flood_cut(src.data, start)
    else:
        cut = _flood_cut_pieces(src, start)
    if cut is not None:
        defects.add(f"more than {MAX_BOUNDARY_LINES} boundary lines: the rest is kept unparsed")
    body: bytes | memoryview | Iterable[bytes]
    if src.data is not None:
        raw_bytes = src.data
        body = memoryview(raw_bytes)[start:cut] if (start or cut is not None) else raw_bytes
    else:
        body = src.pieces(start, cut)
    try:
        msg = _parse_bytes(body, 0)
    except Exception as exc:  # last resort: headers only, body as text
        defects.add(f"MIME structure unreadable ({type(exc).__name__}): body kept as text")
        try:
            msg = _parse_headers_only(src.get(start, cut))
        except Exception as exc2:
            raise ParseError(f"unreadable message: {type(exc2).__name__}: {exc2}") from exc2
        if "content-type" in msg:
            msg.replace_header("content-type", "text/plain")
    linesep = "\r\n" if b"\r\n" in head[start : start + _LINESEP_WINDOW] else "\n"
    del head

    try:
        headers, index = _header_index(msg, defects)
    except Exception as exc:  # never lose the mail over one header
        defects.add(f"headers unreadable ({type(exc).__name__})")
        headers, index = (), {}

    def first(name: str) -> str:
        values = index.get(name)
        return values[0] if values else ""

    def decoded(name: str) -> str:
        value = first(name)
        return _clean(decode_words(value[:MAX_HEADER_VALUE], defects)) if value else ""

    from_pairs = _addresses(index.get("from", []), defects, "From")
    reply_pairs = _addresses(index.get("reply-to", []), defects, "Reply-To")
    sender_pairs = _addresses(index.get("sender", []), defects, "Sender")
    to = _dedupe(a for _n, a in _addresses(index.get("to", []), defects, "To"))
    cc = _dedupe(a for _n, a in _addresses(index.get("cc", []), defects, "Cc"))

    from_addr = from_name = ""
    for label, pairs in (("From", from_pairs), ("Reply-To", reply_pairs), ("Sender", sender_pairs)):
        if pairs:
            from_name, from_addr = pairs[0]
            if label != "From":
                defects.add(f"no address in From: sender taken from {label}")
            break
    else:
        if "from" in index:
            defects.add("From has no usable address")
        else:
            defects.add("From missing")
    if not from_addr and first("from"):
        from_name = decoded("from")[:200]
    if from_name and _looks_like_other_address(from_name, from_addr):
        defects.add("display name of the sender looks like another address")
    for name in ("subject", "message-id", "date"):
        if name not in index:
            defects.add(f"{name.title()} missing")

    references = _dedupe(i for v in index.get("references", []) for i in _msgids(v))
    if len(references) > MAX_REFERENCES:
        references = [references[0], *references[-(MAX_REFERENCES - 1) :]]
    in_reply_to = _dedupe(i for v in index.get("in-reply-to", []) for i in _msgids(v))[
        :MAX_REFERENCES
    ]

    walker = _Walker(defects=defects, linesep=linesep)
    try:
        segments = walker.walk(msg, 1, "")
        text = _segments_text(segments)
        html = "\n".join(s.html for s in segments if s.html and s.html.strip() and not s.fallback)
    except Exception as exc:  # safety net: keep the whole mail as an attachment
        defects.add(
            f"body not extracted ({type(exc).__name__}: {str(exc)[:80]}); original attached"
        )
        walker.attachments.append(_Part("original-message.eml", "message/rfc822", src.whole()))
        text = html = ""

    if cut is not None:
        walker.attachments.append(_Part("unparsed-remainder.txt", "text/plain", src.get(cut)))
    cids = {urllib.parse.unquote(c).lower() for h in walker.html_seen for c in _CID.findall(h)}
    attachments = tuple(
        Attachment(
            filename=p.filename,
            content_type=p.content_type,
            data=p.data,
            inline=bool(p.content_id) and p.content_id.lower() in cids,
            content_id=p.content_id,
        )
        for p in walker.attachments
    )
    try:
        content_type = msg.get_content_type()
    except Exception:
        content_type = "text/plain"
    if content_type == _FLATTENED_TYPE:
        content_type = (
            str(msg.get(_FLATTENED_HEADER, "multipart/mixed")).split(";")[0].strip().lower()
        )

    return ParsedMail(
        message_id=_first_msgid(first("message-id")),
        subject=decoded("subject"),
        from_addr=from_addr,
        from_name=from_name,
        reply_to=reply_pairs[0][1] if reply_pairs else "",
        sender_header=sender_pairs[0][1] if sender_pairs else "",
        to=tuple(to),
        cc=tuple(cc),
        date=decoded("date"),
        in_reply_to=tuple(in_reply_to),
        references=tuple(references),
        headers=headers,
        text=text,
        html=html,
        attachments=attachments,
        content_type=content_type,
        report_type=walker.report_type,
        size=src.size,
        defects=defects.result(),
        parts_not_examined=_not_examined(msg) if walker.parts > MAX_PARTS else (0, 0),
    )


def _not_examined(msg: Message) -> tuple[int, int]:
    """(leaf parts, of which with a file name) after the first MAX_PARTS parts of `msg`."""
    leaves = named = 0
    for n, part in enumerate(msg.walk()):
        if n < MAX_PARTS or part.is_multipart():
            continue
        leaves += 1
        try:
            named += part.get_filename() is not None
        except Exception:  # a broken parameter still names nothing
            pass
    return leaves, named


_MESSAGE_ID_LINE = re.compile(rb"^message-id:([^\n]*(?:\n[ \t][^\n]*)*)", re.I | re.M)


def extract_message_id(raw: bytes) -> str:
    """The Message-ID (without angle brackets) from the header section only; "" when none.

    Cheap: no MIME parse, only the header section is scanned. Agrees with `parse(raw).message_id`.
    """
    try:
        start = _start_of_message(raw, None)
    except ParseError:
        return ""
    block = _HEADER_BLOCK.match(raw, start)
    section = raw[start : block.end() if block else start]
    m = _MESSAGE_ID_LINE.search(section)
    if not m:
        return ""
    value = m.group(1).decode("ascii", "surrogateescape")
    return _first_msgid(_unfold(_from_8bit(value, None, "Message-ID")))
