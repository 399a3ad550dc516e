"""The MIME walk: from the `Message` tree to body segments (plain / HTML, in reading order) and
attachments; forwarded messages, reports, signed/encrypted parts, TNEF, broken boundaries."""

from __future__ import annotations

import io
import mimetypes
import re
import struct
from dataclasses import dataclass, field
from email.generator import BytesGenerator
from email.message import Message
from email.policy import compat32
from typing import Any

from tnefparse import TNEF

from gateway import mail as limits
from gateway.mail.charset import _SURROGATES, _from_8bit, decode_bytes
from gateway.mail.defects import _Defects
from gateway.mail.headers import _clean, _decoded_header, _unfold, decode_words
from gateway.mail.html import html_to_text
from gateway.mail.mime import (
    _DROP_DECODED_MIN,
    _FLATTENED_HEADER,
    _FLATTENED_TYPE,
    _fast_base64,
    _parse_bytes,
)
from gateway.mail.uuencode import extract_uuencoded

_TNEF_SIGNATURE = b"\x78\x9f\x3e\x22"
_TNEF_TYPES = frozenset({"application/ms-tnef", "application/vnd.ms-tnef"})


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


# A plain alternative that only points at the HTML one ("view this mail in your browser").
_STUB = re.compile(
    r"(?i)\b(?:view|read|open|see)\b.{0,40}\b(?:in|on)\b.{0,20}\b(?:browser|web)|"
    r"\bHTML\b.{0,60}\b(?:version|mail|e-mail|message|only|required|support|enable|f[aä]hig)|"
    r"(?:im|in Ihrem) Browser|navigateur|version en ligne"
)
_STUB_MAX = 300  # characters: a longer plain part is a text of its own


def _plain_is_stub(plain: str, html: str | None) -> bool:
    """The plain alternative is empty of content the HTML one has: a pointer to the HTML version,
    or a small fraction of its text (the plain part a mailer generates from a title)."""
    if not html or not html.strip():
        return False
    short = plain.strip()
    if len(short) > _STUB_MAX:
        return False
    if _STUB.search(short):
        return True
    return len(short) < 80 and len(html_to_text(html)) > 4 * len(short) + 100


def _segments_text(segments: list[_Segment]) -> str:
    primary = [s for s in segments if not s.fallback]
    chosen = primary if any(s.has_text() for s in primary) else segments
    pieces = []
    for seg in chosen:
        if seg.plain is not None and seg.plain.strip() and not _plain_is_stub(seg.plain, seg.html):
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
        if self.parts > limits.MAX_PARTS:
            if self.parts == limits.MAX_PARTS + 1:
                self.defects.add(
                    f"more than {limits.MAX_PARTS} MIME parts: the rest were not examined"
                )
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
                f"MIME nesting deeper than {limits.MAX_DEPTH} levels: inner parts kept undecoded",
                path,
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
            text, files = extract_uuencoded(text)
            for name, payload in files:
                name = _safe_filename(name) or self.generated_name("application/octet-stream")
                self.attachments.append(_Part(name, _guess_type(name), payload))
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
