"""From bytes to the standard library's `Message` tree: where the message starts, the bounded
feed parser (nesting depth, parameter header caps), the part-flood cut and the base64 fast path."""

from __future__ import annotations

import binascii
import re
from collections.abc import Iterable
from email import errors as email_errors
from email.feedparser import BytesFeedParser
from email.message import Message
from email.policy import compat32

from gateway import mail as limits
from gateway.errors import ParseError
from gateway.mail.defects import _Defects

_FLATTENED_TYPE = "application/x-gateway-nested-mime"
_FLATTENED_HEADER = "X-Gateway-Original-Content-Type"
_PARAM_HEADER_CAP = (
    16 * 1024
)  # Content-Type/-Disposition beyond this: stdlib param parsing is quadratic


_HEADER_LINE = re.compile(rb"(?:From |[\x21-\x39\x3b-\x7e]+[ \t]*:)")
_HEADER_BLOCK = re.compile(rb"(?:(?:From |[\x21-\x39\x3b-\x7e]*:|[ \t])[^\n]*(?:\n|\Z))*")
_BLANK_LINE = re.compile(rb"[ \t]*\r?\n")
_BOUNDARY_LIKE = re.compile(rb"^--\S", re.M)


def _flood_cut(raw: bytes, start: int) -> int | None:
    """Offset of the first boundary-like line past `MAX_BOUNDARY_LINES`, or None."""
    for count, m in enumerate(_BOUNDARY_LIKE.finditer(raw, start), 1):
        if count > limits.MAX_BOUNDARY_LINES:
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
        if depth > limits.MAX_DEPTH and cur.get_content_maintype() in ("multipart", "message"):
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
        for start in range(0, len(view), limits._FEED_CHUNK):
            parser.feed(bytes(view[start : start + limits._FEED_CHUNK]))
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
