"""The ticket text every backend sends: a header block naming the real sender, then the body.

The customer-port systems (SuperOffice SOAP, InterServer) make the API account the author, so the
real sender must head the text; the others get the same block for a uniform ticket.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Literal

from gateway.models import Attachment, ParsedMail

QuotedMode = Literal["fold", "drop", "attach", "keep"]
QUOTED_MARKER = "---------- quoted text and signature, folded by ticket-gateway ----------"
QUOTED_FILE = "quoted-text.txt"
ORIGINAL_HTML_FILE = "original-message.html"

DEFAULT_HEADER_FIELDS = ("From", "To", "Cc", "Date")
TRUNCATION_MARKER = (
    "\n\n[... message truncated by ticket-gateway: {dropped} characters not shown ...]"
)


def sender_display(mail: ParsedMail) -> str:
    """`Name <addr>` or just the address (or "(unknown sender)")."""
    addr = mail.from_addr or "(unknown sender)"
    return f"{mail.from_name} <{addr}>" if mail.from_name else addr


def header_block(mail: ParsedMail, fields: Iterable[str] = DEFAULT_HEADER_FIELDS) -> str:
    lines = []
    for name in fields:
        key = name.lower()
        if key == "from":
            value = sender_display(mail)
        elif key == "to":
            value = ", ".join(mail.to)
        elif key == "cc":
            value = ", ".join(mail.cc)
        elif key == "date":
            value = mail.date
        elif key == "subject":
            value = mail.subject
        else:
            value = mail.header(name) or ""
        if value:
            lines.append(f"{name}: {value}")
    return "\n".join(lines)


def ticket_text(
    mail: ParsedMail,
    *,
    header_fields: Iterable[str] = DEFAULT_HEADER_FIELDS,
    max_chars: int | None = None,
    not_forwarded: Iterable[str] = (),
    automatic: bool = False,
) -> str:
    """Header block, blank line, body; names of attachments not forwarded; truncated visibly."""
    parts = []
    if automatic:
        parts.append("[automatic reply: recorded by ticket-gateway, not acknowledged]")
    block = header_block(mail, header_fields)
    if block:
        parts.append(block)
    body = mail.text.strip("\n") or "(no text)"
    parts.append(body)
    skipped = list(not_forwarded)
    if skipped:
        parts.append("Attachments not forwarded: " + ", ".join(skipped))
    text = "\n\n".join(parts)
    if max_chars is not None and len(text) > max_chars:
        dropped = len(text) - max_chars
        text = text[:max_chars] + TRUNCATION_MARKER.format(dropped=dropped)
    return text


def reply_view(mail: ParsedMail, mode: QuotedMode, *, followup: bool) -> ParsedMail:
    """The mail as the ticket message shows it: the new text first; the quoted history and the
    signature (`ParsedMail.quoted_text`, `.signature`) as `[backends.NAME] quoted` says.

    fold    new text, then a marker line, then signature and quoted history (the default)
    drop    new text and a note saying what was left out (follow-ups only: the history is in the
            ticket already; a new ticket folds instead)
    attach  new text and a note; signature and quoted history as `quoted-text.txt` (and the
            mail's HTML as `original-message.html`)
    keep    the body as it came
    New tickets are changed only when they carry a quoted or forwarded block (a signature alone
    stays where it is). The HTML body goes with `keep` only: it still holds the history.
    """
    if mode == "keep" or not (mail.quoted_text or (followup and mail.signature)):
        return mail
    if mode == "drop" and not followup:
        mode = "fold"
    new = mail.new_text.strip("\n") or "(no new text)"
    rest = "\n\n".join(p for p in (mail.signature, mail.quoted_text) if p.strip())
    attachments = mail.attachments
    if mode == "fold":
        text = f"{new}\n\n{QUOTED_MARKER}\n{rest}"
    elif mode == "drop":
        lines = rest.count("\n") + 1
        text = f"{new}\n\n[quoted text and signature left out by ticket-gateway: {lines} lines]"
    else:  # attach
        extra = [Attachment(QUOTED_FILE, "text/plain", rest.encode("utf-8"))]
        if mail.html:
            extra.append(Attachment(ORIGINAL_HTML_FILE, "text/html", mail.html.encode("utf-8")))
        names = ", ".join(a.filename for a in extra)
        text = f"{new}\n\n[quoted text and signature attached by ticket-gateway: {names}]"
        attachments = (*attachments, *extra)
    return dataclasses.replace(mail, text=text, html="", attachments=attachments)


def select_attachments(
    mail: ParsedMail,
    *,
    max_bytes: int,
    max_total: int,
    blocked_extensions: Iterable[str],
) -> tuple[list[Attachment], list[str]]:
    """Split the mail's real attachments into (forwarded, names of those not forwarded).

    Inline images referenced from the HTML body are not attachments of the ticket. A file is not
    forwarded when its extension is blocked, it is larger than `max_bytes`, or it would take the
    total past `max_total`; the ticket text lists those by name.
    """
    blocked = {e.lower() if e.startswith(".") else "." + e.lower() for e in blocked_extensions}
    keep: list[Attachment] = []
    skipped: list[str] = []
    total = 0
    for att in mail.attachments:
        if att.inline:
            continue
        name = att.filename or "attachment"
        ext = ("." + name.rsplit(".", 1)[-1].lower()) if "." in name else ""
        if ext in blocked:
            skipped.append(f"{name} (blocked type)")
        elif att.size > max_bytes:
            skipped.append(f"{name} (too large: {att.size} bytes)")
        elif total + att.size > max_total:
            skipped.append(f"{name} (total size limit)")
        else:
            keep.append(att)
            total += att.size
    return keep, skipped
