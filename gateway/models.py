"""Plain value types that flow between the stages: envelope, parsed mail, routing decision, ticket ref.

They are frozen dataclasses (picklable, so a parsed mail can come back from the parser process) and
carry no behaviour beyond small derived properties. Every stage may import this module; no stage
imports another stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class Envelope:
    """What the intake knew besides the bytes: SMTP envelope or its equivalent."""

    mail_from: str  # "" is the null sender <>
    rcpt_tos: tuple[str, ...]
    peer: str = ""  # client IP of the SMTP session, "" when unknown
    intake: str = "smtp"  # "smtp", "pipe" or the name of an [[imap]] section
    received_at: float = 0.0  # unix time


@dataclass(frozen=True)
class Attachment:
    filename: str
    content_type: str
    data: bytes
    inline: bool = False  # an inline part referenced by cid: from the HTML body
    content_id: str = ""

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass(frozen=True)
class ParsedMail:
    """A mail as the rest of the pipeline sees it: decoded text, never raw MIME.

    Addresses are lower-case `local@domain` strings; names are decoded display names.
    `headers` keeps every header (decoded) in order, names as written.
    """

    message_id: str = ""  # without angle brackets, "" when missing
    subject: str = ""
    from_addr: str = ""
    from_name: str = ""
    reply_to: str = ""
    sender_header: str = ""
    to: tuple[str, ...] = ()
    cc: tuple[str, ...] = ()
    date: str = ""  # as written in the Date header (decoded), "" when missing
    in_reply_to: tuple[str, ...] = ()  # message ids without angle brackets
    references: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    text: str = ""  # the body as plain text (converted from HTML when there is no text part)
    html: str = ""  # the HTML body, "" when none
    # A reply split (gateway.mail.reply): the new text, its signature and the quoted history;
    # all "" when the body has neither a signature nor a quote (then `text` is all new).
    new_text: str = ""
    signature: str = ""
    quoted_text: str = ""
    attachments: tuple[Attachment, ...] = ()
    content_type: str = "text/plain"  # top-level MIME type
    report_type: str = (
        ""  # multipart/report report-type parameter (delivery-status, disposition-notification)
    )
    size: int = 0
    defects: tuple[str, ...] = ()  # what the parser had to repair
    # MIME parts past the parser's limit (MAX_PARTS), not examined: (leaf parts, those with a
    # file name); the ticket text says so, since their attachments are missing from the ticket
    parts_not_examined: tuple[int, int] = (0, 0)

    def header(self, name: str) -> str | None:
        """First value of header `name` (case-insensitive), or None."""
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return None

    def header_all(self, name: str) -> list[str]:
        low = name.lower()
        return [v for k, v in self.headers if k.lower() == low]


Action = Literal["new", "followup", "suppress"]


@dataclass(frozen=True)
class Decision:
    """What route decided for one mail. Pure data: `gateway route --json` prints exactly this."""

    rule: str
    backend: str  # a [backends.NAME] name; "" when suppressed before a backend was chosen
    action: Action
    ticket: dict[str, Any] = field(default_factory=dict)  # fields for the backend's type
    followup_of: str | None = None  # the ref of the ticket this mail follows up
    ack: str | None = "default"  # template name, None = no acknowledgement
    reasons: tuple[str, ...] = ()
    automatic: bool = False  # the mail is auto-generated (never acknowledged)
    # a matching rule says match.automatic = true: automatic mail may become a new ticket (else
    # only a follow-up of a ticket that exists)
    automatic_ticketed: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "backend": self.backend,
            "action": self.action,
            "ticket": self.ticket,
            "followup_of": self.followup_of,
            "ack": self.ack is not None,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class TicketRef:
    """A ticket in a ticket system: `id` is what follow-up calls take, `ref` what the sender sees."""

    backend: str
    system: str
    id: str
    ref: str


class RawSource(Protocol):
    """A stored message read in pieces (the spool's blob), so that a big mail is never held whole
    in memory beside its parsed form (see `gateway.mail.parse`, `classify.content_digest`)."""

    size: int

    def read(self, offset: int, length: int) -> bytes: ...
