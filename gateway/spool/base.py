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
    ack: tuple[str, str, bytes, str] | None = None  # (rcpt, envelope from, bytes, ack Message-ID)


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
