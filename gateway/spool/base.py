"""The `Spool` protocol and its row types. See `gateway.spool.sqlite` for the default.

Message states (DESIGN): queued -> processing -> done | deferred | dead | suppressed | duplicate.
`deferred` is queued with a later next-attempt time (retry, paused backend, follow-up waiting for
its original). `dead` holds mails that failed for good and quarantined mails; `gateway queue retry`
puts them back. A mail whose backend create call was in flight at a crash is flagged `uncertain`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol

from gateway.models import Envelope


class State(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    DEFERRED = "deferred"
    DEAD = "dead"
    SUPPRESSED = "suppressed"
    DUPLICATE = "duplicate"


FINAL_STATES = (State.DONE, State.DEAD, State.SUPPRESSED, State.DUPLICATE)


@dataclass(frozen=True)
class PutResult:
    id: int
    duplicate: bool = False  # the source key (e.g. IMAP mailbox+UIDVALIDITY+UID) was stored before


@dataclass(frozen=True)
class MessageRow:
    id: int
    state: str
    envelope: Envelope
    size: int
    attempts: int = 0
    next_attempt_at: float = 0.0
    first_attempt_at: float | None = None
    last_error: str = ""
    backend: str = ""
    rule: str = ""
    action: str = ""
    ticket_ref: str = ""
    ticket_id: str = ""
    message_id: str = ""
    subject: str = ""
    progress: dict[str, Any] = field(default_factory=dict)
    uncertain: bool = False
    updated_at: float = 0.0
    crashes: int = 0  # times a crash (of the worker) interrupted its processing
    raw: bytes | None = None  # loaded only where asked for


@dataclass(frozen=True)
class AckRow:
    id: int
    message_id: int  # the spool message it acknowledges
    rcpt: str
    mail_from: str  # envelope sender of the acknowledgement ("" = null sender)
    data: bytes
    attempts: int
    next_attempt_at: float


@dataclass(frozen=True)
class Outcome:
    """How a processed message ends; recorded with its side effects in one transaction."""

    state: State
    reason: str = ""
    backend: str = ""
    rule: str = ""
    action: str = ""
    ticket_ref: str = ""
    ticket_id: str = ""
    system: str = ""
    requester: str = ""
    subject: str = ""
    message_id: str = ""  # the mail's Message-ID: mapped to the ticket for threading
    ack: AckDraft | None = None  # the acknowledgement to queue with it (subject to limits)


@dataclass(frozen=True)
class AckLimits:
    """Hourly acknowledgement limits, checked by the spool in the transaction that queues the
    acknowledgement (so that concurrent workers and nodes cannot slip past them together).

    `per_sender` counts on the normalised address, `per_domain` on the organisational domain
    (0 = no limit for either; per_sender 0 means none at all). `global_limit` (0 = none) is split:
    senders without a ticket conversation ("strangers") may use `stranger_share` of it, so that
    a flood of strangers leaves the rest to senders who already have a ticket."""

    per_sender: int = 5
    per_domain: int = 100
    global_limit: int = 5000
    stranger_share: float = 0.8


@dataclass(frozen=True)
class AckDraft:
    """An acknowledgement to queue in the outbox together with an outcome."""

    rcpt: str
    mail_from: str  # envelope sender ("" = null sender)
    data: bytes
    message_id: str = ""  # the ack's own Message-ID: a reply to it threads to the ticket
    sender_key: str = ""  # the normalised recipient the per-sender limit counts ("" = rcpt)
    domain: str = ""  # the recipient's organisational domain ("" = from rcpt)
    limits: AckLimits | None = None  # None: queue it without checking limits


class Spool(Protocol):
    """Durable storage of messages, ticket maps and the acknowledgement outbox.

    `put` returns only after the message and its envelope are durable (the caller then says yes
    to its peer); it raises `SpoolError` when that is impossible. Concurrent puts share commits.
    Every other method is also durable on return.
    """

    async def put(
        self, raw: bytes, envelope: Envelope, *, source_key: str | None = None
    ) -> PutResult: ...

    async def has_source_key(self, source_key: str) -> bool: ...

    async def close(self) -> None: ...
