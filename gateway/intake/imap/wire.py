"""What the IMAP intake reads from and writes to the wire: mailbox names in modified UTF-7, UID
sets, aioimaplib's FETCH response lines, the last line of a response for messages, and the
envelope (mail-from, recipients) from the delivery headers the mailbox's server added."""

from __future__ import annotations

import base64
import email.parser
import email.utils
import re
from collections.abc import Iterable, Sequence
from email.policy import compat32
from typing import Any

import aioimaplib

_NEWS_RE = re.compile(rb"^\* \d+ (EXISTS|RECENT)\b", re.IGNORECASE)
_FETCH_START_RE = re.compile(rb"^(?:\* )?\d+ FETCH \(", re.IGNORECASE)
_UID_RE = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_SIZE_RE = re.compile(rb"\bRFC822\.SIZE (\d+)", re.IGNORECASE)
_UIDVALIDITY_RE = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)


# -- small helpers ------------------------------------------------------------------------------


def _imap_utf7(name: str) -> str:
    """Mailbox name in IMAP's modified UTF-7 (RFC 3501 5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            b64 = base64.b64encode("".join(pending).encode("utf-16-be")).decode()
            out.append("&" + b64.rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def _mailbox_arg(name: str) -> str:
    return aioimaplib.quoted(_imap_utf7(name))


def uid_set(uids: Iterable[int]) -> str:
    """`1:3,7,9:10` for [1, 2, 3, 7, 9, 10]."""
    parts: list[str] = []
    run: list[int] = []
    for uid in sorted(set(uids)):
        if run and uid == run[-1] + 1:
            run.append(uid)
            continue
        if run:
            parts.append(f"{run[0]}:{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [uid]
    if run:
        parts.append(f"{run[0]}:{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def parse_fetch(lines: Sequence[Any]) -> list[tuple[bytes, bytes | None]]:
    """Split aioimaplib FETCH response lines into (attribute text, literal or None) per message.

    aioimaplib gives header lines as `bytes` and literal data as `bytearray`; a message whose
    body has unbalanced parentheses makes it keep the `* ` prefix on the following lines.
    """
    entries: list[tuple[bytes, bytes | None]] = []
    text: bytes | None = None
    literal: bytes | None = None
    for item in lines:
        if isinstance(item, bytearray):
            if text is not None and literal is None:
                literal = bytes(item)
            continue
        if not isinstance(item, bytes):
            continue
        if _FETCH_START_RE.match(item):
            if text is not None:
                entries.append((text, literal))
            text, literal = item, None
        elif text is not None:
            text += b" " + item
    if text is not None:
        entries.append((text, literal))
    return entries


def _response_text(resp: Any) -> str:
    lines = getattr(resp, "lines", None) or [b""]
    last = lines[-1]
    if isinstance(last, bytes | bytearray):
        return bytes(last).decode("utf-8", "replace")[:200]
    return str(last)[:200]


def _address(value: str) -> str:
    _, addr = email.utils.parseaddr(value)
    return addr.strip().lower()


def envelope_fields(raw: bytes, username: str) -> tuple[str, tuple[str, ...]]:
    """(mail_from, rcpt_tos) from the delivery headers the mailbox's server added."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw if end < 0 else raw[:end]
    headers = email.parser.BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n\r\n")
    mail_from = ""
    return_path = headers.get_all("Return-Path") or []
    if return_path:
        mail_from = _address(str(return_path[0]))
    rcpts: list[str] = []
    for value in headers.get_all("X-Original-To") or []:
        addr = _address(str(value))
        if addr and addr not in rcpts:
            rcpts.append(addr)
    if not rcpts:
        delivered = headers.get_all("Delivered-To") or []
        if delivered and _address(str(delivered[0])):
            rcpts.append(_address(str(delivered[0])))
    if not rcpts:
        rcpts.append(username.lower() if "@" in username else username)
    return mail_from, tuple(rcpts)
