"""The backend seam: `Backend` protocol, progress recording, and the type table.

A backend turns a routed mail into a ticket (or a message on one) in one ticket system and maps
that system's error signalling into the error tree of `gateway.errors`:
`TransientError` (retry), `PermanentError` (dead-letter) or `BackendUnavailable` (pause backend).
"""

from __future__ import annotations

from typing import Any, Protocol

from gateway.models import Decision, ParsedMail, TicketRef


class Progress(Protocol):
    """Steps of a multi-call operation, recorded durably as they complete.

    A backend calls `begin(step)` right before a call that creates something in the ticket system
    and `done(step, **data)` right after it answered. `begin` commits to the spool before it
    returns, and with it every step done before; `done` starts its write at once and the next
    `begin` (or the end of the mail's calls) waits for it, so a create call never starts before
    what came before it is durable.
    After a crash, `data` holds what completed steps returned (so the next attempt resumes at the
    next step) and a step that was begun but not done marks the mail `uncertain`.
    """

    data: dict[str, Any]

    async def begin(self, step: str) -> None: ...

    async def done(self, step: str, **values: Any) -> None: ...


class Backend(Protocol):
    """One configured ticket system.

    `name` is the [backends.NAME] key, `system` the type ("superoffice-soap", ...).
    `open_ticket` creates a ticket holding the mail (title, body with the sender's header block,
    attachments) with the decision's ticket fields and returns its `TicketRef`.
    `add_message` appends the mail to an existing ticket (`ref.id`); `automatic` marks the text
    as an automatic reply. `ticket_status` returns "open", "closed" or None when the system
    cannot tell; raises PermanentError when the ticket does not exist.
    `find_existing` is asked after a crash left a create call `uncertain`: it returns the ticket
    the interrupted call made, when the system can be searched, else None. `searchable` says
    whether it can: where not, a ticket created again for an uncertain mail is a possible
    duplicate, and `possible_first(ref, mail)` names the ticket the interrupted call may have
    made (the id of a likely candidate, by what the system lets the gateway read; None unknown).
    All methods raise only `gateway.errors.BackendError` subclasses.
    """

    name: str
    system: str
    searchable: bool

    async def open_ticket(
        self, decision: Decision, mail: ParsedMail, progress: Progress
    ) -> TicketRef: ...

    async def add_message(
        self, ref: TicketRef, mail: ParsedMail, progress: Progress, *, automatic: bool = False
    ) -> None: ...

    async def ticket_status(self, ref: TicketRef) -> str | None: ...

    async def find_existing(self, decision: Decision, mail: ParsedMail) -> TicketRef | None: ...

    async def possible_first(self, ref: TicketRef, mail: ParsedMail) -> str | None: ...

    async def aclose(self) -> None: ...


class MemoryProgress:
    """A `Progress` that records nothing durably; for tests and `gateway route`. See `Progress`."""

    def __init__(self, data: dict[str, Any] | None = None) -> None:
        self.data: dict[str, Any] = dict(data or {})
        self.begun: list[str] = []

    async def begin(self, step: str) -> None:
        self.begun.append(step)

    async def done(self, step: str, **values: Any) -> None:
        self.data[step] = values
