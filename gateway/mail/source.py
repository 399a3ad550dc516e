"""The public entry points: `parse` (whole bytes, or a RawSource read piece by piece) and the
cheap `extract_message_id`."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterable, Iterator

from gateway import mail as limits
from gateway.errors import ParseError
from gateway.mail.charset import _from_8bit
from gateway.mail.defects import _Defects
from gateway.mail.headers import (
    _addresses,
    _clean,
    _dedupe,
    _first_msgid,
    _header_index,
    _looks_like_other_address,
    _msgids,
    _unfold,
    decode_words,
)
from gateway.mail.html import html_to_text
from gateway.mail.mime import (
    _BOUNDARY_LIKE,
    _FLATTENED_HEADER,
    _FLATTENED_TYPE,
    _HEADER_BLOCK,
    _flood_cut,
    _parse_bytes,
    _parse_headers_only,
    _start_of_message,
)
from gateway.mail.reply import Split, split_html, split_text
from gateway.mail.walk import _CID, _Part, _Segment, _segments_text, _Walker
from gateway.models import Attachment, ParsedMail, RawSource


class _Raw:
    """The message bytes for `parse`: whole `bytes`, or a RawSource read piece by piece."""

    def __init__(self, data: bytes | None, source: RawSource | None) -> None:
        self.data, self.source = data, source
        self.size = len(data) if data is not None else (source.size if source else 0)

    def head(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.source is not None
        return self.source.read(0, min(self.size, limits._SOURCE_HEAD))

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
        size = limits._FEED_CHUNK
        for off in range(a, b, size):
            yield self.get(off, min(b, off + size))

    def line_pieces(self, a: int) -> Iterator[tuple[int, bytes]]:
        """(offset, bytes) pieces from `a` to the end, each cut after a line end (so that no
        line-anchored match crosses a cut)."""
        carry, carry_at = b"", a
        for off in range(a, self.size, limits._FEED_CHUNK):
            chunk = carry + self.get(off, min(self.size, off + limits._FEED_CHUNK))
            nl = chunk.rfind(b"\n")
            if nl < 0 or off + limits._FEED_CHUNK >= self.size:
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
            if count > limits.MAX_BOUNDARY_LINES:
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
        if src.size <= limits._SOURCE_HEAD:
            src.whole()
    defects = _Defects()
    head = src.head()
    if src.data is None and (head.isspace() or not head):
        head = src.whole()  # odd enough to read the whole of it
    start = _start_of_message(head, defects)
    if src.data is None and start + limits._LINESEP_WINDOW > len(head):
        head = src.whole()  # the message starts beyond the first piece: read it all
        start = _start_of_message(head, _Defects())
    if src.data is not None:
        cut = _flood_cut(src.data, start)
    else:
        cut = _flood_cut_pieces(src, start)
    if cut is not None:
        defects.add(
            f"more than {limits.MAX_BOUNDARY_LINES} boundary lines: the rest is kept unparsed"
        )
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
    linesep = "\r\n" if b"\r\n" in head[start : start + limits._LINESEP_WINDOW] else "\n"
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
        return _clean(decode_words(value[: limits.MAX_HEADER_VALUE], defects)) if value else ""

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
    if len(references) > limits.MAX_REFERENCES:
        references = [references[0], *references[-(limits.MAX_REFERENCES - 1) :]]
    in_reply_to = _dedupe(i for v in index.get("in-reply-to", []) for i in _msgids(v))[
        : limits.MAX_REFERENCES
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
        segments = []
    reply = _reply_split(segments, text)

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
        new_text=reply.new if reply.found else "",
        signature=reply.signature,
        quoted_text=reply.quoted,
        attachments=attachments,
        content_type=content_type,
        report_type=walker.report_type,
        size=src.size,
        defects=defects.result(),
    )


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


def _reply_split(segments: list[_Segment], text: str) -> Split:
    """The new text of a reply, apart from its signature and quoted history (`mail.reply`).

    An HTML-only body is split in its HTML tree (where the clients mark their quotes) and the
    halves converted; a body with a text part is split as text.
    """
    try:
        primary = [s for s in segments if s.has_text() and not s.fallback]
        if len(primary) == 1 and primary[0].html and not (primary[0].plain or "").strip():
            halves = split_html(primary[0].html)
            if halves is not None:
                head = split_text(html_to_text(halves[0]))
                return Split(head.new, head.signature, html_to_text(halves[1]))
        return split_text(text)
    except Exception:  # never lose the mail over the split: the text stays whole
        return Split(text, "", "")
