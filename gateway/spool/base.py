"""The `Spool` protocol and its typed rows: everything the gateway stores goes through it.

Engines: `gateway.spool.sqlite` (one file, embedded, the default) and `gateway.spool.postgres`
(a PostgreSQL database shared by several gateway nodes). `gateway.spool.open_spool` picks one
from `SpoolSettings`; nothing else names an engine.

Message states (DESIGN): queued -> processing -> done | deferred | dead | suppressed | duplicate.
`deferred` is queued with a later next-attempt time (retry, paused backend, follow-up waiting for
its original). `dead` holds mails that failed for good and quarantined mails; `gateway queue retry`
puts them back. A mail whose backend create call was in flight at a crash is flagged `uncertain`.

Claims and leases: a worker claims due mails (`claim_due`); each claimed row names its `owner`
(`node/worker-index`) and holds a lease until `lease_until`. The owner renews its leases with
`heartbeat`. A process that dies (kill -9, power loss) stops renewing: after the lease any node's
`take_over` puts its mails back (flagged uncertain where a backend call was in flight). A process
restarting under the same owner name takes its own rows back at once (`recover`). Named leases
(`try_lease`) give one holder at a time for the cluster: an IMAP mailbox, the retention run.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from gateway.models import Envelope, RawSource

BLOB_STREAM_MIN = 1 << 20  # mails above this size are stored and read in pieces where possible


class State(enum.StrEnum):
    QUEUED = "queued"
    PROCESSING = "processing"
    DONE = "done"
    DEFERRED = "deferred"
    DEAD = "dead"
    SUPPRESSED = "suppressed"
    DUPLICATE = "duplicate"


FINAL_STATES = (State.DONE, State.DEAD, State.SUPPRESSED, State.DUPLICATE)
WAITING_STATES = (State.QUEUED, State.DEFERRED, State.PROCESSING)


@dataclass(frozen=True)
class SpoolSettings:
    """What opening a spool needs; built from `[spool]`/`[gateway]` by the app and the CLI.

    Exactly one of `path` (SQLite) and `url` (PostgreSQL) is set.
    """

    path: Path | None = None
    url: str = ""
    password: str | None = None  # PostgreSQL; from password_file / password_env
    node: str = "localhost"  # this gateway node ([gateway] node)
    worker: int = 0  # index of the worker process on the node (owner = node/worker)
    lease: float = 30.0  # seconds a claim or a named lease lasts without a heartbeat
    durable: bool = True  # False: the worker's commits may skip fsync (SQLite NORMAL)
    read_only: bool = False  # the dry run: look-ups only, never create or migrate
    pool_size: int = 4  # PostgreSQL connections per process

    @property
    def engine(self) -> str:
        return "postgresql" if self.url else "sqlite"

    @property
    def owner(self) -> str:
        return f"{self.node}/{self.worker}"


class BodySource(RawSource, Protocol):
    """A stored message read in pieces; `close` soon (it may hold a read snapshot)."""

    def close(self) -> None: ...


# -- rows -----------------------------------------------------------------------------------------


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
    claimed_by: str = ""  # owner (node/worker) holding it while `processing`
    lease_until: float | None = None
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
class TicketInfo:
    """A ticket the gateway made (the ticket map)."""

    backend: str
    system: str
    ticket_id: str
    requester: str


@dataclass(frozen=True)
class ThreadHit:
    """The ticket a Message-ID belongs to (the thread map)."""

    backend: str
    ref: str


@dataclass(frozen=True)
class Recovered:
    requeued: int = 0
    uncertain: int = 0


@dataclass(frozen=True)
class QueueCounts:
    """Messages per state and acknowledgements per outbox state."""

    by_state: dict[str, int]
    outbox_pending: int = 0
    outbox_failed: int = 0

    def __getitem__(self, state: str) -> int:
        return self.by_state.get(state, 0)

    @property
    def waiting(self) -> int:
        return sum(self[s] for s in WAITING_STATES)

    def to_dict(self) -> dict[str, int]:
        out = {s.value: 0 for s in State}
        out.update(self.by_state)
        out["outbox_pending"] = self.outbox_pending
        out["outbox_failed"] = self.outbox_failed
        return out


@dataclass(frozen=True)
class NodeInfo:
    """A worker process of a node, as its last heartbeat left it."""

    owner: str
    node: str
    seen_at: float
    started_at: float
    claims: int = 0


# -- retention and erasure: what a run did ----------------------------------------------------------


@dataclass(frozen=True)
class RetentionPolicy:
    """Ages in days (see `gateway.spool.retention`); plain values, built from `[retention]`."""

    done_raw_days: float = 30.0
    suppressed_raw_days: float = 7.0
    duplicate_raw_days: float = 7.0
    dead_days: float = 90.0
    maps_days: float = 365.0
    outbox_days: float = 7.0
    batch: int = 500


@dataclass
class PurgeResult:
    raw_purged: int = 0  # mails whose raw bytes were removed
    raw_bytes: int = 0  # how many bytes that was
    messages_deleted: int = 0  # finished mails older than maps_days
    dead_deleted: int = 0
    tickets_deleted: int = 0
    threads_deleted: int = 0
    outbox_deleted: int = 0
    batches: int = 0

    def changed(self) -> int:
        return (
            self.raw_purged
            + self.messages_deleted
            + self.dead_deleted
            + self.tickets_deleted
            + self.threads_deleted
            + self.outbox_deleted
        )

    def log_fields(self) -> dict[str, int]:
        return {
            "raw_purged": self.raw_purged,
            "raw_bytes": self.raw_bytes,
            "messages_deleted": self.messages_deleted,
            "dead_deleted": self.dead_deleted,
            "tickets_deleted": self.tickets_deleted,
            "threads_deleted": self.threads_deleted,
            "outbox_deleted": self.outbox_deleted,
            "batches": self.batches,
        }


@dataclass
class Erasure:
    """What `gateway erase` found (and, unless a dry run, removed) for one address."""

    address: str
    message_ids: list[int] = field(default_factory=list)
    raw_bytes: int = 0
    busy: list[int] = field(default_factory=list)  # `processing` right now: not touched
    tickets: int = 0
    threads: int = 0
    outbox: int = 0
    scanned_to: int = 0  # highest message id looked at
    compacted: bool = True  # no copy of the deleted rows is left in the engine's files

    @property
    def messages(self) -> int:
        return len(self.message_ids)


# -- the protocol -----------------------------------------------------------------------------------


class Spool(Protocol):
    """Durable storage of messages, ticket maps, the acknowledgement outbox, claims and leases.

    Every method is a coroutine and durable on return; a storage failure (engine unreachable,
    disk full) raises `SpoolError`, never the engine's own exception. `put` returns only after
    the message and its envelope are committed (the caller then says yes to its peer);
    concurrent puts share commits (group commit).
    """

    engine: str  # "sqlite" | "postgresql"
    node: str
    owner: str  # node/worker: what claims and heartbeats are recorded under
    # True: `on_work` and `on_slot_freed` carry other processes' signals (PostgreSQL
    # LISTEN/NOTIFY); False: the intake wakes its own worker and slot waiters only poll
    signals: bool

    # -- intake ------------------------------------------------------------------------------
    async def put(
        self, raw: bytes, envelope: Envelope, *, source_key: str | None = None
    ) -> PutResult:
        """Store a new message `queued`. A `source_key` stored before makes it a duplicate
        (PutResult.duplicate, nothing stored)."""
        ...

    async def has_source_key(self, source_key: str) -> bool: ...

    async def known_source_keys(self, source_keys: Collection[str]) -> set[str]:
        """Those of `source_keys` that a stored mail carries: one query for a whole IMAP chunk
        (its UIDs' keys), not one per UID."""
        ...

    # -- the worker's queue --------------------------------------------------------------------
    async def hold_owner(self) -> None:
        """Wait until no other live process works under this owner name (a predecessor still
        draining), then keep it for the life of this spool object."""
        ...

    async def recover(self) -> Recovered:
        """Put back what this owner left `processing` (it crashed: no other process runs under
        its name). Each counts one crash; mails with a backend call in flight become uncertain.
        The call slots the owner held are freed."""
        ...

    async def take_over(self) -> Recovered:
        """Put back mails whose owner's lease ran out (that process died); counts a crash."""
        ...

    async def heartbeat(
        self, claims: Collection[int] | None = None, *, slots: Collection[int] | None = None
    ) -> None:
        """Record the owner alive and renew its leases: on the mails in `claims` (those it is
        still working on; None: all it holds), on its outbox claims and on the call slots whose
        labels are in `slots` (None: those labelled with its claims). A claim or slot not
        renewed (its processing ended without an outcome, e.g. the spool was unreachable)
        expires and is taken over like a dead owner's."""
        ...

    async def nodes(self, within: float) -> list[NodeInfo]:
        """Worker processes that sent a heartbeat in the last `within` seconds."""
        ...

    async def claim_due(self, limit: int) -> list[int]:
        """Mark up to `limit` due messages `processing` for this owner (oldest first); their ids.
        Two owners never get the same message."""
        ...

    async def next_due_at(self) -> float | None: ...

    def on_work(self, callback: Callable[[], None]) -> None:
        """Call `callback` (on the event loop) whenever another process may have made work due
        (stored or released mail). Engines without such signals never call it: their intake
        wakes its worker itself."""
        ...

    async def release(self, ids: list[int]) -> Recovered:
        """Put back mails a clean shutdown cut short (no crash counted)."""
        ...

    async def load(self, msg_id: int, *, with_raw: bool = True) -> MessageRow | None: ...

    async def read_body(self, msg_id: int) -> bytes | None:
        """The raw bytes of a message, None once purged."""
        ...

    async def open_body(self, msg_id: int) -> BodySource | None:
        """The raw bytes to read in pieces (a big mail), None once purged. Close it soon."""
        ...

    async def set_identity(
        self, msg_id: int, message_id: str, digest: str, subject: str
    ) -> int | None:
        """Record the parsed Message-ID/digest; return the id of another copy of this mail
        (same digest and Message-ID, not dead or duplicate) that goes first, atomically, so that
        two copies processed at once cannot both miss each other: an earlier copy, or a later one
        that is done or already in hand (it found no copy when it started); None when this copy
        goes first (no other, or only later copies that wait)."""
        ...

    async def state_of(self, msg_id: int) -> str | None: ...

    async def begin_step(
        self, msg_id: int, step: str, *, progress: dict[str, Any] | None = None
    ) -> None:
        """A backend call is about to start: a crash from here on makes the mail uncertain.
        `progress`: the steps done so far, recorded in the same write (as `done_step`)."""
        ...

    async def done_step(self, msg_id: int, progress: dict[str, Any]) -> None: ...

    async def defer(
        self,
        msg_id: int,
        *,
        error: str,
        delay: float,
        backend: str = "",
        count_attempt: bool = True,
    ) -> None: ...

    async def release_deferred(self, backend: str) -> int:
        """Make the deferred mails of `backend` due now (it answered again after failures)."""
        ...

    async def finish(self, msg_id: int, outcome: Outcome) -> str:
        """Record the final outcome, the ticket/thread maps and the acknowledgement at once.

        The acknowledgement's hourly limits (`AckLimits`) are checked in the same transaction
        (so that concurrent workers and nodes cannot slip past them together): returns "" when
        it was queued (or there was none), else the limit that withheld it ("sender", "domain"
        or "global")."""
        ...

    # -- ticket and thread maps --------------------------------------------------------------
    async def ticket_by_ref(
        self, ref: str, *, prefer_backend: str | None = None
    ) -> TicketInfo | None:
        """A ticket the gateway made, by its ref. Two systems may use the same reference
        (separate numbering); `prefer_backend` picks the one the rules would choose, else the
        most recent wins."""
        ...

    async def thread_lookup(self, message_ids: list[str]) -> ThreadHit | None:
        """The ticket a Message-ID among `message_ids` belongs to (first wins)."""
        ...

    async def pending_original(self, message_ids: list[str], before_id: int) -> int | None:
        """An earlier message, still waiting for its ticket, whose Message-ID is in the list."""
        ...

    # -- outbox and limits -------------------------------------------------------------------
    async def acks_since(self, sender_key: str | None, since: float) -> int:
        """Acknowledgements queued since `since` to the normalised sender `sender_key` (None: to
        anyone), cluster-wide."""
        ...

    async def due_acks(self, limit: int = 50) -> list[AckRow]:
        """Pending acknowledgements that are due, claimed for this owner for one lease."""
        ...

    async def ack_result(
        self, ack_id: int, *, sent: bool, error: str = "", retry_in: float | None = None
    ) -> None: ...

    # -- named leases (one holder at a time across the cluster) -------------------------------
    async def try_lease(self, name: str, seconds: float) -> bool:
        """Take or renew the lease `name` for this owner; False while another holds it."""
        ...

    async def drop_lease(self, name: str) -> None: ...

    # -- backend slots (concurrency limits across the cluster) --------------------------------
    async def acquire_slot(self, backend: str, limit: int, msg_id: int) -> bool:
        """Take one of `limit` call slots of `backend`, labelled `msg_id` (the mail it is taken
        for); False when all are taken, or when another owner holds a slot under that label.
        The owner may lend a slot it holds to one call after another (of other mails) until it
        gives it back with `release_slot(backend, label)`; it renews its slots with `heartbeat`
        and a dead owner's slots expire with its lease. No other call frees a slot (an outcome
        or a requeue of the labelling mail does not: the slot may be lent to another by now),
        except `recover`, which frees what the owner's previous process held."""
        ...

    async def release_slot(self, backend: str, msg_id: int) -> None: ...

    def on_slot_freed(self, callback: Callable[[str], None]) -> None:
        """Call `callback(backend)` (on the event loop) when a process may have released a call
        slot of `backend`. Engines without such signals never call it: waiters poll."""
        ...

    async def pause_backend(self, backend: str, until: float, reason: str) -> None:
        """Record a backend pause for every node (wall-clock `until`)."""
        ...

    async def backend_pauses(self) -> dict[str, tuple[float, str]]:
        """backend -> (until, reason) of the pauses still in force."""
        ...

    async def clear_pause(self, backend: str) -> None: ...

    # -- inspection and repair (CLI, /healthz, /metrics) ---------------------------------------
    async def counts(self) -> QueueCounts: ...

    async def oldest_pending(self) -> float | None:
        """received_at of the oldest mail still waiting (queued, deferred, processing)."""
        ...

    async def list_messages(
        self, state: str | None = None, limit: int = 1000
    ) -> list[MessageRow]: ...

    async def retry(self, msg_id: int | None = None, *, all_dead: bool = False) -> int:
        """Put dead (or deferred) messages back in the queue now; returns how many."""
        ...

    async def drop(self, msg_id: int) -> int: ...

    async def stats(self) -> dict[str, Any]:
        """Counts, sizes and ages per state, of the maps and of the outbox (`queue stats`)."""
        ...

    # -- data lifecycle ------------------------------------------------------------------------
    async def purge(self, policy: RetentionPolicy, *, pause: float = 0.0) -> PurgeResult:
        """Apply the retention policy once, in small batches."""
        ...

    async def find_erasure(self, address: str) -> Erasure:
        """Read-only: everything `erase` would remove for `address` (the dry run)."""
        ...

    async def erase(self, address: str, scanned: Erasure) -> Erasure:
        """Remove every mail and map entry of `address` and leave no copy in the engine's
        files where the engine allows it (`Erasure.compacted`)."""
        ...

    async def backup(self, dest: Path) -> int:
        """A consistent copy while the daemon runs; its size in bytes (SQLite only)."""
        ...

    async def close(self) -> None: ...
