"""The shared spool: one PostgreSQL database for several gateway nodes. See `Spool`.

Driver: psycopg 3 with its async connection pool (`psycopg_pool`), used through their public API.
What PostgreSQL itself provides does the cluster work:

- Durability: `put` returns after the COMMIT (synchronous_commit as the server has it, `on` by
  default). Puts that arrive while a commit is in flight wait and go together in the next
  transaction, one round trip for the whole batch (pipeline mode): group commit, as in SQLite.
- Claims: `UPDATE ... WHERE id IN (SELECT ... FOR UPDATE SKIP LOCKED)`: two nodes never claim one
  mail and never wait for each other. Each claim names its owner (`node/worker`) and holds a lease
  (`lease_until`) that the owner's heartbeat renews; after a node dies, any node's `take_over`
  puts its mails back (uncertain where a backend call was in flight).
- Wake-ups: a batch of puts (and every release) sends `NOTIFY gateway_work`; each worker LISTENs
  on a session connection of its own and claims at once instead of polling. A released backend
  call slot sends `NOTIFY gateway_slots, 'BACKEND'`, so that a worker waiting for one tries again
  at once.
- One process per owner name: a session-level advisory lock (`hold_owner`).
- Schema versions: `meta.schema_version`, created or migrated at start-up in one transaction under
  a transaction-level advisory lock, so nodes starting together migrate once, one at a time.
- Limits across the cluster: the ack limits count the shared outbox; backend concurrency is a row
  per call in `slots` (taken under a per-backend advisory lock); pauses are rows in `pauses`;
  named leases (IMAP mailboxes, retention) are rows in `leases`.

Failures: every psycopg error (server down, connection lost, pool exhausted) becomes `SpoolError`,
so SMTP answers 451, IMAP leaves mail in the mailbox and /healthz says `spool: ...`; the pool
reconnects by itself when the server is back.

Times are epoch seconds from the node's clock (as in SQLite), so nodes must keep their clocks in
step (NTP); a lease is long against any sane skew.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from gateway.errors import SpoolError
from gateway.models import Envelope
from gateway.spool.base import (
    AckLimits,
    AckRow,
    Erasure,
    MessageRow,
    NodeInfo,
    Outcome,
    PurgeResult,
    PutResult,
    QueueCounts,
    Recovered,
    RetentionPolicy,
    SpoolSettings,
    State,
    ThreadHit,
    TicketInfo,
)
from gateway.spool.rows import (
    MSG_COLUMNS,
    ack_limit_steps,
    ack_row,
    copy_going_first,
    message_row,
    node_info,
    pick_ticket,
)

log = logging.getLogger("gateway.spool")

T = TypeVar("T")

SCHEMA_VERSION = 1
MIGRATE_LOCK = 0x67617465  # pg_advisory_xact_lock key for schema changes ("gate")
ACK_LIMIT_LOCK = 0x61636B6C  # pg_advisory_xact_lock key for queueing a limited ack ("ackl")
CHANNEL = "gateway_work"
SLOT_CHANNEL = "gateway_slots"  # payload: the backend whose call slot was released
CONNECT_TIMEOUT = 3.0  # s to get a connection before the spool counts as unreachable
MAX_BATCH = 256  # puts in one transaction

# -- the schema (version 1) -------------------------------------------------------------------------

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    id BIGSERIAL PRIMARY KEY,
    state TEXT NOT NULL,
    intake TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    rcpt_tos TEXT NOT NULL,
    peer TEXT NOT NULL DEFAULT '',
    received_at DOUBLE PRECISION NOT NULL,
    size BIGINT NOT NULL,
    source_key TEXT UNIQUE,
    message_id TEXT NOT NULL DEFAULT '',
    digest TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    first_attempt_at DOUBLE PRECISION,
    last_error TEXT NOT NULL DEFAULT '',
    backend TEXT NOT NULL DEFAULT '',
    rule TEXT NOT NULL DEFAULT '',
    action TEXT NOT NULL DEFAULT '',
    ticket_ref TEXT NOT NULL DEFAULT '',
    ticket_id TEXT NOT NULL DEFAULT '',
    progress TEXT NOT NULL DEFAULT '{}',
    inflight TEXT NOT NULL DEFAULT '',
    uncertain INTEGER NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL,
    purged_at DOUBLE PRECISION,
    crashes INTEGER NOT NULL DEFAULT 0,
    claimed_by TEXT NOT NULL DEFAULT '',
    lease_until DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS messages_due ON messages (next_attempt_at, id)
    WHERE state IN ('queued', 'deferred');
CREATE INDEX IF NOT EXISTS messages_claims ON messages (claimed_by, lease_until)
    WHERE state = 'processing';
CREATE INDEX IF NOT EXISTS messages_msgid ON messages (message_id);
CREATE INDEX IF NOT EXISTS messages_digest ON messages (digest);
CREATE INDEX IF NOT EXISTS messages_age ON messages (state, updated_at);
CREATE TABLE IF NOT EXISTS bodies (
    id BIGINT PRIMARY KEY REFERENCES messages (id) ON DELETE CASCADE,
    raw BYTEA NOT NULL
);
CREATE TABLE IF NOT EXISTS tickets (
    backend TEXT NOT NULL,
    ref TEXT NOT NULL,
    system TEXT NOT NULL,
    ticket_id TEXT NOT NULL,
    requester TEXT NOT NULL DEFAULT '',
    subject TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (backend, ref)
);
CREATE INDEX IF NOT EXISTS tickets_ref ON tickets (ref);
CREATE INDEX IF NOT EXISTS tickets_age ON tickets (created_at);
CREATE TABLE IF NOT EXISTS threads (
    message_id TEXT PRIMARY KEY,
    backend TEXT NOT NULL,
    ref TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS threads_ticket ON threads (backend, ref, created_at);
CREATE INDEX IF NOT EXISTS threads_age ON threads (created_at);
CREATE TABLE IF NOT EXISTS outbox (
    id BIGSERIAL PRIMARY KEY,
    message_id BIGINT NOT NULL,
    rcpt TEXT NOT NULL,
    mail_from TEXT NOT NULL,
    data BYTEA NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    sent_at DOUBLE PRECISION,
    claimed_by TEXT NOT NULL DEFAULT '',
    lease_until DOUBLE PRECISION,
    sender_key TEXT NOT NULL DEFAULT '',  -- normalised rcpt: the per-sender ack limit
    domain TEXT NOT NULL DEFAULT '',      -- organisational domain: the per-domain ack limit
    known INTEGER NOT NULL DEFAULT 0      -- rcpt had a ticket before: the global limit's split
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX IF NOT EXISTS outbox_rcpt ON outbox (rcpt, created_at);
CREATE INDEX IF NOT EXISTS outbox_age ON outbox (state, created_at);
CREATE INDEX IF NOT EXISTS outbox_message ON outbox (message_id);
CREATE INDEX IF NOT EXISTS outbox_sender ON outbox (sender_key, created_at);
CREATE INDEX IF NOT EXISTS outbox_domain ON outbox (domain, created_at);
CREATE INDEX IF NOT EXISTS outbox_created ON outbox (created_at, known);
CREATE INDEX IF NOT EXISTS tickets_requester ON tickets (requester);
CREATE TABLE IF NOT EXISTS nodes (
    owner TEXT PRIMARY KEY,
    node TEXT NOT NULL,
    seen_at DOUBLE PRECISION NOT NULL,
    started_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS slots (
    backend TEXT NOT NULL,
    msg_id BIGINT NOT NULL,
    owner TEXT NOT NULL,
    until DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (backend, msg_id)
);
CREATE TABLE IF NOT EXISTS pauses (
    backend TEXT PRIMARY KEY,
    until DOUBLE PRECISION NOT NULL,
    reason TEXT NOT NULL DEFAULT ''
);
"""

# every table `gateway spool copy` fills and refuses to overwrite
DATA_TABLES = ("messages", "bodies", "tickets", "threads", "outbox")

# Migrations: version -> statements that bring a spool from version - 1 to it. Never edit a
# released one; add a new one and raise SCHEMA_VERSION.
MIGRATIONS: dict[int, tuple[str, ...]] = {}

# One put; in a group (a transaction of several), or alone: then it is one statement in
# autocommit (its own transaction, one round trip, no BEGIN/COMMIT, no pipeline) that also
# signals the workers, which a group sends as a NOTIFY of its own. Alone, the put costs half
# the client CPU it costs as a group of one (0.75 instead of 1.55 ms here), and groups of
# one are what a node sees when several nodes share the load.
_PUT_TEMPLATE = """
WITH m AS (
    INSERT INTO messages (state, intake, mail_from, rcpt_tos, peer, received_at, size,
                          source_key, next_attempt_at, updated_at)
    VALUES ('queued', %s, %s, %s, %s, %s, %s, %s, 0, %s)
    ON CONFLICT (source_key) DO NOTHING
    RETURNING id
), b AS (
    INSERT INTO bodies (id, raw) SELECT id, %s FROM m
)
SELECT id, false AS duplicate FROM m{notify}
UNION ALL
SELECT id, true AS duplicate FROM messages WHERE %s::text IS NOT NULL AND source_key = %s
    AND NOT EXISTS (SELECT 1 FROM m)
"""
_PUT = _PUT_TEMPLATE.format(notify="")
_PUT_ONE = _PUT_TEMPLATE.format(notify=f" CROSS JOIN (SELECT pg_notify('{CHANNEL}', '')) AS w")


class _Body:
    """A message's bytes as a `BodySource` (PostgreSQL hands a bytea over whole)."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self.size = len(data)

    def read(self, offset: int, length: int) -> bytes:
        return self._data[offset : offset + length]

    def close(self) -> None:
        self._data = b""


Conn = psycopg.AsyncConnection[dict[str, Any]]


class PostgresSpool:
    """See `Spool`. Open with `await PostgresSpool.open(settings)`."""

    engine = "postgresql"
    signals = True  # LISTEN/NOTIFY: on_work, on_slot_freed

    def __init__(self, settings: SpoolSettings, *, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.url = settings.url
        self.node = settings.node
        self.owner = settings.owner
        self.lease = settings.lease
        self.clock = clock
        self.opened_version: int | None = None
        # autocommit: a single statement is its own transaction (one round trip, no BEGIN and
        # COMMIT around it); several statements run in `_tx`, an explicit transaction
        self._kwargs: dict[str, Any] = {"row_factory": dict_row, "autocommit": True}
        if settings.password is not None:
            self._kwargs["password"] = settings.password
        self._pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            settings.url,
            min_size=1,
            max_size=max(2, settings.pool_size),
            kwargs=self._kwargs,
            open=False,
            name=f"spool-{self.owner}",
            timeout=CONNECT_TIMEOUT,
            reconnect_timeout=0,  # never give up: the server may be down for a while
        )
        self._closed = False
        self._started_at = clock()
        self._puts: list[tuple[tuple[Any, ...], asyncio.Future[PutResult]]] = []
        self._put_task: asyncio.Task[None] | None = None
        self._session: psycopg.AsyncConnection[Any] | None = None  # LISTEN + owner lock
        self._session_task: asyncio.Task[None] | None = None
        self._on_work: list[Callable[[], None]] = []
        self._on_slot: list[Callable[[str], None]] = []
        self._hold_owner = False
        self._owner_held = asyncio.Event()
        self.commits = 0
        self.puts = 0

    @classmethod
    async def open(
        cls, settings: SpoolSettings, *, clock: Callable[[], float] = time.time
    ) -> PostgresSpool:
        spool = cls(settings, clock=clock)
        try:
            await spool._pool.open(wait=True, timeout=CONNECT_TIMEOUT * 2)
        except (PoolTimeout, psycopg.Error) as exc:
            await spool._pool.close()
            raise SpoolError(f"{spool.where()}: cannot connect: {exc}") from exc
        try:
            if settings.read_only:
                spool.opened_version = await spool._check_version()
            else:
                spool.opened_version = await spool._prepare()
        except BaseException:
            await spool._pool.close()
            raise
        return spool

    def where(self) -> str:
        """The server and database, never the password."""
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        return (
            f"postgresql://{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"
        )

    # -- plumbing ---------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _conn(self, *, tx: bool) -> AsyncIterator[Conn]:
        """A pooled connection, inside one transaction when `tx` (else each statement is its
        own); any psycopg failure is `SpoolError`."""
        if self._closed:
            raise SpoolError("spool is closed")
        try:
            async with self._pool.connection() as conn:
                if tx:
                    async with conn.transaction():
                        yield conn
                else:
                    yield conn
        except PoolTimeout as exc:
            raise SpoolError(f"spool unreachable ({self.where()}): {exc}") from exc
        except psycopg.Error as exc:
            raise SpoolError(f"spool failed ({self.where()}): {exc}") from exc

    async def _run(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """`fn`'s statements in one transaction."""
        async with self._conn(tx=True) as conn:
            return await fn(conn)

    async def _batch(self, fn: Callable[[Conn], Awaitable[T]]) -> T:
        """`fn`'s statements in one transaction, in pipeline mode: they go to the server
        together and only reading a result waits for it (BEGIN, the statements up to the
        first result read, then the rest with COMMIT: two round trips instead of one per
        statement). The transaction is what `_run` gives, statement for statement."""
        async with self._conn(tx=False) as conn, conn.pipeline(), conn.transaction():
            return await fn(conn)

    async def _script(self, parts: list[tuple[str, tuple[Any, ...]]]) -> dict[str, Any] | None:
        """Several statements in ONE round trip and one transaction: PostgreSQL runs the
        statements of one simple query as one implicit transaction, each statement seeing what
        committed before it started (as in `_run`), so a lock taken by one statement holds for
        the ones after it and to the commit. The parameters are bound client-side (psycopg's
        `AsyncClientCursor`, which allows several statements in one query); no pipeline, no
        BEGIN/COMMIT round trips. The first row of the last statement, if it returns rows.

        Measured against the same statements in a pipelined transaction (`_batch`):
        set_identity 0.8 instead of 2.4 ms of client CPU, the server's share unchanged."""
        query = ";\n".join(q for q, _ in parts)
        params = tuple(p for _, ps in parts for p in ps)
        async with self._conn(tx=False) as conn:
            cur = psycopg.AsyncClientCursor(conn)
            await cur.execute(query, params)
            while cur.nextset():
                pass
            return await cur.fetchone() if cur.description is not None else None

    async def _one(self, query: str, params: Any = None) -> dict[str, Any] | None:
        """One statement (its own transaction); its first row."""
        async with self._conn(tx=False) as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchone()

    async def _all(self, query: str, params: Any = None) -> list[dict[str, Any]]:
        async with self._conn(tx=False) as conn:
            cur = await conn.execute(query, params)
            return await cur.fetchall()

    async def _exec(self, query: str, params: Any = None) -> int:
        async with self._conn(tx=False) as conn:
            cur = await conn.execute(query, params)
            return cur.rowcount

    # -- schema -------------------------------------------------------------------------------------

    async def _check_version(self) -> int:
        row = await self._one(
            "SELECT value FROM meta WHERE key = 'schema_version'"
            if await self._has_meta()
            else "SELECT NULL AS value"
        )
        version = int(row["value"]) if row and row["value"] is not None else None
        if version != SCHEMA_VERSION:
            raise SpoolError(f"{self.where()}: spool schema {version}, expected {SCHEMA_VERSION}")
        return version

    async def _has_meta(self) -> bool:
        row = await self._one("SELECT to_regclass('meta') IS NOT NULL AS ok")
        return bool(row and row["ok"])

    async def _prepare(self) -> int:
        """Create or migrate the schema, one node at a time (transaction advisory lock)."""

        async def go(conn: Conn) -> int:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
            cur = await conn.execute("SELECT to_regclass('meta') IS NOT NULL AS ok")
            has = await cur.fetchone()
            found: int | None = None
            if has and has["ok"]:
                cur = await conn.execute("SELECT value FROM meta WHERE key = 'schema_version'")
                r = await cur.fetchone()
                found = int(r["value"]) if r else None
            if found is None:
                await conn.execute(SCHEMA.encode())
                await conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(SCHEMA_VERSION),),
                )
                log.info(
                    "spool_created",
                    extra={"fields": {"engine": "postgresql", "version": SCHEMA_VERSION}},
                )
                return SCHEMA_VERSION
            if found > SCHEMA_VERSION:
                raise SpoolError(
                    f"{self.where()}: spool schema version {found} is newer than this gateway"
                    f" understands ({SCHEMA_VERSION}); upgrade the gateway"
                )
            for version in range(found + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version]:
                    await conn.execute(statement.encode())
                log.warning(
                    "spool_migrated_step",
                    extra={"fields": {"engine": "postgresql", "version": version}},
                )
            if found < SCHEMA_VERSION:
                await conn.execute(
                    "UPDATE meta SET value = %s WHERE key = 'schema_version'",
                    (str(SCHEMA_VERSION),),
                )
            return found

        return await self._run(go)

    # -- lifecycle ----------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        if self._put_task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(self._put_task), 30)
        self._closed = True
        for _, fut in self._puts:
            if not fut.done():
                fut.set_exception(SpoolError("spool is closed"))
        self._puts.clear()
        if self._session_task is not None:
            self._session_task.cancel()
            with contextlib.suppress(BaseException):
                await self._session_task
        if self._session is not None:
            with contextlib.suppress(psycopg.Error):
                await self._session.close()
        await self._pool.close()

    # -- the session connection: LISTEN and the owner lock -----------------------------------------

    def _ensure_session(self) -> None:
        if self._session_task is None and not self._closed:
            self._session_task = asyncio.create_task(self._session_loop(), name="spool-session")

    async def _session_loop(self) -> None:
        """Keep one connection that LISTENs for work and holds this owner's advisory lock;
        reconnect after the server went away."""
        delay = 0.5
        while not self._closed:
            try:
                conn = await psycopg.AsyncConnection.connect(
                    self.url,
                    autocommit=True,
                    connect_timeout=int(CONNECT_TIMEOUT),
                    **{k: v for k, v in self._kwargs.items() if k == "password"},
                )
            except psycopg.Error as exc:
                log.warning("spool_session_connect_failed", extra={"fields": {"error": str(exc)}})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            self._session = conn
            delay = 0.5
            try:
                if self._hold_owner:
                    waited = False
                    while True:
                        cur = await conn.execute(
                            "SELECT pg_try_advisory_lock(hashtext(%s)) AS ok", (self.owner,)
                        )
                        got = await cur.fetchone()
                        if got and got[0]:
                            break
                        if not waited:
                            log.warning(
                                "waiting_for_owner_lock", extra={"fields": {"owner": self.owner}}
                            )
                            waited = True
                        await asyncio.sleep(0.5)
                    self._owner_held.set()
                await conn.execute(f"LISTEN {CHANNEL}")
                await conn.execute(f"LISTEN {SLOT_CHANNEL}")
                for cb in self._on_work:  # whatever came while no one listened
                    cb()
                async for note in conn.notifies():
                    if note.channel == SLOT_CHANNEL:
                        for slot_cb in self._on_slot:
                            slot_cb(note.payload)
                        continue
                    for cb in self._on_work:
                        cb()
            except psycopg.Error as exc:
                if not self._closed:
                    log.warning("spool_session_lost", extra={"fields": {"error": str(exc)}})
            finally:
                self._owner_held.clear()
                with contextlib.suppress(psycopg.Error):
                    await conn.close()
                self._session = None
            if not self._closed:
                await asyncio.sleep(delay)

    def on_work(self, callback: Callable[[], None]) -> None:
        self._on_work.append(callback)
        self._ensure_session()

    def on_slot_freed(self, callback: Callable[[str], None]) -> None:
        self._on_slot.append(callback)
        self._ensure_session()

    async def hold_owner(self) -> None:
        """See `Spool.hold_owner`: a session-level advisory lock on the owner name."""
        self._hold_owner = True
        if self._session_task is not None and not self._owner_held.is_set():
            # the session started without the lock: start it again so it takes the lock
            self._session_task.cancel()
            with contextlib.suppress(BaseException):
                await self._session_task
            self._session_task = None
        self._ensure_session()
        await self._owner_held.wait()

    # -- intake: group commit -------------------------------------------------------------------------

    async def put(
        self, raw: bytes, envelope: Envelope, *, source_key: str | None = None
    ) -> PutResult:
        """See `Spool.put`. Puts arriving while a batch commits go together in the next one."""
        if self._closed:
            raise SpoolError("spool is closed")
        now = self.clock()
        params = (
            envelope.intake,
            envelope.mail_from,
            json.dumps(list(envelope.rcpt_tos)),
            envelope.peer,
            envelope.received_at or now,
            len(raw),
            source_key,
            now,
            bytes(raw),
            source_key,
            source_key,
        )
        fut: asyncio.Future[PutResult] = asyncio.get_running_loop().create_future()
        self._puts.append((params, fut))
        if self._put_task is None or self._put_task.done():
            self._put_task = asyncio.create_task(self._flush_puts(), name="spool-puts")
        result = await fut
        self.puts += 1
        return result

    async def _flush_puts(self) -> None:
        while self._puts and not self._closed:
            batch, self._puts = self._puts[:MAX_BATCH], self._puts[MAX_BATCH:]
            try:
                results = await self._put_batch([p for p, _ in batch])
            except SpoolError as exc:
                log.error(
                    "spool_commit_failed",
                    extra={"fields": {"error": str(exc), "batch": len(batch)}},
                )
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (params, fut), res in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if res is None:  # another node stored the same source key at the same moment
                    fut.set_result(PutResult(id=await self._id_of(params[6]), duplicate=True))
                else:
                    fut.set_result(res)

    async def _put_batch(self, params: list[tuple[Any, ...]]) -> list[PutResult | None]:
        if len(params) == 1:  # one statement, committed on return (see _PUT_ONE)
            row = await self._one(_PUT_ONE, params[0])
            self.commits += 1
            return [PutResult(id=row["id"], duplicate=row["duplicate"]) if row else None]

        async def go(conn: Conn) -> list[PutResult | None]:
            out: list[PutResult | None] = []
            async with conn.cursor() as cur:
                await cur.executemany(_PUT, params, returning=True)
                while True:
                    row = await cur.fetchone()
                    out.append(PutResult(id=row["id"], duplicate=row["duplicate"]) if row else None)
                    if not cur.nextset():
                        break
            await conn.execute(f"NOTIFY {CHANNEL}")  # delivered at commit
            return out

        results = await self._run(go)
        self.commits += 1
        return results

    async def _id_of(self, source_key: str) -> int:
        row = await self._one("SELECT id FROM messages WHERE source_key = %s", (source_key,))
        if row is None:
            raise SpoolError("spool write failed: source key vanished")
        return int(row["id"])

    async def has_source_key(self, source_key: str) -> bool:
        return source_key in await self.known_source_keys([source_key])

    async def known_source_keys(self, source_keys: Collection[str]) -> set[str]:
        keys = list(dict.fromkeys(source_keys))
        if not keys:
            return set()
        rows = await self._all(
            "SELECT source_key FROM messages WHERE source_key = ANY(%s)", (keys,)
        )
        return {row["source_key"] for row in rows}

    # -- recovery, claims and leases -----------------------------------------------------------------

    async def recover(self) -> Recovered:
        # the call slots of this owner's previous process (this one holds none yet); their
        # waiters on every node are signalled, as by release_slot
        await self._exec(
            "WITH freed AS (DELETE FROM slots WHERE owner = %s RETURNING backend)"
            " SELECT pg_notify(%s, backend) FROM (SELECT DISTINCT backend FROM freed) AS f",
            (self.owner, SLOT_CHANNEL),
        )
        return await self._requeue("claimed_by IN (%s, '')", [self.owner], crashed=True)

    async def take_over(self) -> Recovered:
        return await self._requeue(
            "lease_until IS NOT NULL AND lease_until < %s", [self.clock()], crashed=True
        )

    async def release(self, ids: list[int]) -> Recovered:
        if not ids:
            return Recovered()
        return await self._requeue("id = ANY(%s)", [list(ids)], crashed=False)

    async def _requeue(self, cond: str, params: list[Any], *, crashed: bool) -> Recovered:
        now = self.clock()
        where = f"state = 'processing' AND {cond}"

        async def go(conn: Conn) -> Recovered:
            cur = await conn.execute(
                f"SELECT id FROM messages WHERE {where} FOR UPDATE SKIP LOCKED", params
            )
            ids = [r["id"] for r in await cur.fetchall()]
            if not ids:
                return Recovered()
            cur = await conn.execute(
                "UPDATE messages SET uncertain = 1, last_error = %s"
                " WHERE id = ANY(%s) AND inflight != ''",
                ("interrupted during a backend call: the ticket system may already have it", ids),
            )
            unc = cur.rowcount
            cur = await conn.execute(
                "UPDATE messages SET state = 'queued', inflight = '', next_attempt_at = %s,"
                " claimed_by = '', lease_until = NULL, crashes = crashes + %s, updated_at = %s"
                " WHERE id = ANY(%s)",
                (now, 1 if crashed else 0, now, ids),
            )
            n = cur.rowcount
            await conn.execute(f"NOTIFY {CHANNEL}")
            return Recovered(requeued=n, uncertain=unc)

        return await self._run(go)

    async def heartbeat(
        self, claims: Collection[int] | None = None, *, slots: Collection[int] | None = None
    ) -> None:
        now = self.clock()
        until = now + self.lease
        ids = None if claims is None else [int(i) for i in claims]
        labels = ids if slots is None else [int(i) for i in slots]

        async def go(conn: Conn) -> None:
            await conn.execute(
                "UPDATE messages SET lease_until = %s"
                " WHERE state = 'processing' AND claimed_by = %s"
                " AND (%s::bigint[] IS NULL OR id = ANY(%s::bigint[]))",
                (until, self.owner, ids, ids),
            )
            await conn.execute(
                "UPDATE outbox SET lease_until = %s WHERE state = 'pending' AND claimed_by = %s",
                (until, self.owner),
            )
            await conn.execute(
                "UPDATE slots SET until = %s WHERE owner = %s"
                " AND (%s::bigint[] IS NULL OR msg_id = ANY(%s::bigint[]))",
                (until, self.owner, labels, labels),
            )
            await conn.execute(
                "INSERT INTO nodes (owner, node, seen_at, started_at) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at,"
                " node = excluded.node",
                (self.owner, self.node, now, self._started_at),
            )

        await self._batch(go)

    async def nodes(self, within: float) -> list[NodeInfo]:
        rows = await self._all(
            "SELECT owner, node, seen_at, started_at, (SELECT COUNT(*) FROM messages m"
            "  WHERE m.state = 'processing' AND m.claimed_by = nodes.owner) AS claims"
            " FROM nodes WHERE seen_at >= %s ORDER BY owner",
            (self.clock() - within,),
        )
        return [node_info(r) for r in rows]

    async def claim_due(self, limit: int) -> list[int]:
        now = self.clock()
        rows = await self._all(
            "UPDATE messages SET state = 'processing', attempts = attempts + 1,"
            " first_attempt_at = COALESCE(first_attempt_at, %(now)s), updated_at = %(now)s,"
            " claimed_by = %(owner)s, lease_until = %(until)s"
            " WHERE id IN (SELECT id FROM messages WHERE state IN ('queued', 'deferred')"
            "  AND next_attempt_at <= %(now)s ORDER BY next_attempt_at, id LIMIT %(limit)s"
            "  FOR UPDATE SKIP LOCKED)"
            " RETURNING id, next_attempt_at",
            {"now": now, "owner": self.owner, "until": now + self.lease, "limit": limit},
        )
        return [r["id"] for r in sorted(rows, key=lambda r: (r["next_attempt_at"], r["id"]))]

    async def next_due_at(self) -> float | None:
        row = await self._one(
            "SELECT MIN(next_attempt_at) AS t FROM messages WHERE state IN ('queued', 'deferred')"
        )
        return row["t"] if row else None

    async def load(self, msg_id: int, *, with_raw: bool = True) -> MessageRow | None:
        if not with_raw:
            r = await self._one(f"SELECT {MSG_COLUMNS} FROM messages WHERE id = %s", (msg_id,))
            return None if r is None else message_row(r, None)
        # one statement (one snapshot): the row and its body together
        columns = ", ".join(f"m.{c.strip()}" for c in MSG_COLUMNS.split(","))
        r = await self._one(
            f"SELECT {columns}, b.raw AS body FROM messages m LEFT JOIN bodies b ON b.id = m.id"
            " WHERE m.id = %s",
            (msg_id,),
        )
        if r is None:
            return None
        body = r.pop("body")
        return message_row(r, None if body is None else bytes(body))

    async def read_body(self, msg_id: int) -> bytes | None:
        row = await self._one("SELECT raw FROM bodies WHERE id = %s", (msg_id,))
        return bytes(row["raw"]) if row else None

    async def open_body(self, msg_id: int) -> _Body | None:
        raw = await self.read_body(msg_id)
        return None if raw is None else _Body(raw)

    async def set_identity(
        self, msg_id: int, message_id: str, digest: str, subject: str
    ) -> int | None:
        """See `Spool.set_identity`: under a transaction advisory lock on the digest, so two
        nodes processing two copies at once see each other (the look-up is a statement after
        the lock: it sees what the other committed). One round trip (`_script`)."""
        row = await self._script(
            [
                ("SELECT pg_advisory_xact_lock(hashtext(%s))", (digest,)),
                (
                    "UPDATE messages SET message_id = %s, digest = %s, subject = %s WHERE id = %s",
                    (message_id, digest, subject[:500], msg_id),
                ),
                (
                    "SELECT id, state FROM messages WHERE digest = %s AND message_id = %s"
                    " AND id != %s AND state NOT IN ('dead', 'duplicate') ORDER BY id LIMIT 1",
                    (digest, message_id, msg_id),
                ),
            ]
        )
        return copy_going_first(msg_id, row)

    async def state_of(self, msg_id: int) -> str | None:
        row = await self._one("SELECT state FROM messages WHERE id = %s", (msg_id,))
        return row["state"] if row else None

    async def begin_step(
        self, msg_id: int, step: str, *, progress: dict[str, Any] | None = None
    ) -> None:
        done = None if progress is None else json.dumps(progress)
        await self._exec(
            "UPDATE messages SET progress = COALESCE(%s, progress), inflight = %s WHERE id = %s",
            (done, step, msg_id),
        )

    async def done_step(self, msg_id: int, progress: dict[str, Any]) -> None:
        await self._exec(
            "UPDATE messages SET progress = %s, inflight = '' WHERE id = %s",
            (json.dumps(progress), msg_id),
        )

    async def defer(
        self,
        msg_id: int,
        *,
        error: str,
        delay: float,
        backend: str = "",
        count_attempt: bool = True,
    ) -> None:
        now = self.clock()
        await self._exec(
            "UPDATE messages SET state = 'deferred', last_error = %s, next_attempt_at = %s,"
            " uncertain = CASE WHEN inflight != '' THEN 1 ELSE uncertain END,"
            " inflight = '', backend = CASE WHEN %s != '' THEN %s ELSE backend END,"
            " attempts = attempts - %s, updated_at = %s, claimed_by = '', lease_until = NULL"
            " WHERE id = %s",
            (error[:4000], now + delay, backend, backend, 0 if count_attempt else 1, now, msg_id),
        )

    async def release_deferred(self, backend: str) -> int:
        now = self.clock()

        async def go(conn: Conn) -> int:
            cur = await conn.execute(
                "UPDATE messages SET next_attempt_at = %s WHERE state = 'deferred'"
                " AND backend = %s AND next_attempt_at > %s",
                (now, backend, now),
            )
            if cur.rowcount:
                await conn.execute(f"NOTIFY {CHANNEL}")
            return cur.rowcount

        return await self._run(go)

    async def finish(self, msg_id: int, outcome: Outcome) -> str:
        """See `Spool.finish`: the outcome, the maps and the acknowledgement in one transaction
        and one round trip (`_script`). The hourly limits are counted in a statement after the
        cluster-wide lock, which is held to the commit: workers of several nodes cannot slip
        past a limit together."""
        now = self.clock()
        parts: list[tuple[str, tuple[Any, ...]]] = [
            (
                "UPDATE messages SET state = %s, last_error = %s, backend = %s, rule = %s,"
                " action = %s, ticket_ref = %s, ticket_id = %s, inflight = '',"
                " next_attempt_at = 0, claimed_by = '', lease_until = NULL, updated_at = %s"
                " WHERE id = %s",
                (
                    outcome.state.value,
                    outcome.reason[:4000],
                    outcome.backend,
                    outcome.rule,
                    outcome.action,
                    outcome.ticket_ref,
                    outcome.ticket_id,
                    now,
                    msg_id,
                ),
            )
        ]
        if outcome.state == State.DONE and outcome.ticket_ref:
            parts.append(
                (
                    "INSERT INTO tickets (backend, ref, system, ticket_id, requester, subject,"
                    " created_at) VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    (
                        outcome.backend,
                        outcome.ticket_ref,
                        outcome.system,
                        outcome.ticket_id,
                        outcome.requester,
                        outcome.subject[:500],
                        now,
                    ),
                )
            )
            if outcome.message_id:
                parts.append(_thread_insert(outcome.message_id, outcome, now))
        ack = outcome.ack
        if ack is None:
            await self._script(parts)
            return ""
        rcpt = ack.rcpt.lower()
        sender_key = ack.sender_key or rcpt
        domain = ack.domain or rcpt.rpartition("@")[2]
        if ack.limits is not None:
            parts.append(("SELECT pg_advisory_xact_lock(%s)", (ACK_LIMIT_LOCK,)))
            verdict, verdict_args = _ack_verdict_sql(ack.limits, sender_key, domain, now - 3600)
        else:
            verdict, verdict_args = "''", ()
        # known: a ticket conversation from before (the split of the global limit)
        final = (
            "WITH k AS (SELECT EXISTS (SELECT 1 FROM tickets WHERE requester = %s"
            "  AND created_at < %s) AS known),"
            f" v AS (SELECT ({verdict}) AS verdict, known FROM k),"
            " o AS (INSERT INTO outbox (message_id, rcpt, mail_from, data, state, created_at,"
            "  next_attempt_at, sender_key, domain, known)"
            "  SELECT %s, %s, %s, %s, 'pending', %s, 0, %s, %s, known::int FROM v"
            "  WHERE verdict = '' RETURNING 1)"
        )
        args: tuple[Any, ...] = (
            rcpt,
            now,
            *verdict_args,
            msg_id,
            rcpt,
            ack.mail_from,
            ack.data,
            now,
            sender_key,
            domain,
        )
        if ack.message_id and outcome.ticket_ref:  # a reply to the ack threads to the ticket
            final += (
                ", t AS (INSERT INTO threads (message_id, backend, ref, created_at)"
                "  SELECT %s, %s, %s, %s WHERE EXISTS (SELECT 1 FROM o) ON CONFLICT DO NOTHING)"
            )
            args += (ack.message_id, outcome.backend, outcome.ticket_ref, now)
        parts.append((final + " SELECT verdict FROM v", args))
        row = await self._script(parts)
        return str(row["verdict"]) if row else ""

    # -- ticket and thread maps ------------------------------------------------------------------------

    async def ticket_by_ref(
        self, ref: str, *, prefer_backend: str | None = None
    ) -> TicketInfo | None:
        rows = await self._all(
            "SELECT backend, system, ticket_id, requester FROM tickets WHERE ref = %s"
            " ORDER BY created_at DESC",
            (ref,),
        )
        return pick_ticket(rows, prefer_backend)

    async def thread_lookup(self, message_ids: list[str]) -> ThreadHit | None:
        if not message_ids:
            return None
        rows = await self._all(
            "SELECT message_id, backend, ref FROM threads WHERE message_id = ANY(%s)",
            (list(message_ids),),
        )
        found = {r["message_id"]: r for r in rows}
        for mid in message_ids:  # the first in the mail's order wins
            if mid in found:
                return ThreadHit(found[mid]["backend"], found[mid]["ref"])
        return None

    async def pending_original(self, message_ids: list[str], before_id: int) -> int | None:
        if not message_ids:
            return None
        row = await self._one(
            "SELECT id FROM messages WHERE message_id = ANY(%s) AND id < %s"
            " AND state IN ('queued', 'deferred', 'processing') ORDER BY id LIMIT 1",
            (list(message_ids), before_id),
        )
        return int(row["id"]) if row else None

    # -- outbox --------------------------------------------------------------------------------------------

    async def acks_since(self, sender_key: str | None, since: float) -> int:
        if sender_key is None:
            row = await self._one(
                "SELECT COUNT(*) AS n FROM outbox WHERE created_at >= %s", (since,)
            )
        else:
            row = await self._one(
                "SELECT COUNT(*) AS n FROM outbox WHERE sender_key = %s AND created_at >= %s",
                (sender_key.lower(), since),
            )
        return int(row["n"]) if row else 0

    async def due_acks(self, limit: int = 50) -> list[AckRow]:
        now = self.clock()
        rows = await self._all(
            "UPDATE outbox SET claimed_by = %(owner)s, lease_until = %(until)s"
            " WHERE id IN (SELECT id FROM outbox WHERE state = 'pending'"
            "  AND next_attempt_at <= %(now)s"
            "  AND (claimed_by = %(owner)s OR claimed_by = '' OR lease_until < %(now)s)"
            "  ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED)"
            " RETURNING id, message_id, rcpt, mail_from, data, attempts, next_attempt_at",
            {"owner": self.owner, "until": now + self.lease, "now": now, "limit": limit},
        )
        return [ack_row(r) for r in sorted(rows, key=lambda r: r["id"])]

    async def ack_result(
        self, ack_id: int, *, sent: bool, error: str = "", retry_in: float | None = None
    ) -> None:
        now = self.clock()
        if sent:
            await self._exec(
                "UPDATE outbox SET state = 'sent', sent_at = %s, attempts = attempts + 1,"
                " claimed_by = '', lease_until = NULL WHERE id = %s",
                (now, ack_id),
            )
        elif retry_in is None:
            await self._exec(
                "UPDATE outbox SET state = 'failed', last_error = %s, attempts = attempts + 1,"
                " claimed_by = '', lease_until = NULL WHERE id = %s",
                (error[:2000], ack_id),
            )
        else:
            await self._exec(
                "UPDATE outbox SET last_error = %s, attempts = attempts + 1,"
                " next_attempt_at = %s, claimed_by = '', lease_until = NULL WHERE id = %s",
                (error[:2000], now + retry_in, ack_id),
            )

    # -- named leases, backend slots and pauses ------------------------------------------------------

    async def try_lease(self, name: str, seconds: float) -> bool:
        now = self.clock()
        row = await self._one(
            "INSERT INTO leases (name, owner, until) VALUES (%s, %s, %s)"
            " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, until = excluded.until"
            " WHERE leases.owner = excluded.owner OR leases.until < %s RETURNING owner",
            (name, self.owner, now + seconds, now),
        )
        return row is not None

    async def drop_lease(self, name: str) -> None:
        await self._exec("DELETE FROM leases WHERE name = %s AND owner = %s", (name, self.owner))

    async def acquire_slot(self, backend: str, limit: int, msg_id: int) -> bool:
        now = self.clock()
        # one taker at a time per backend, across the cluster (the lock is held to the commit;
        # the count is a statement after it); one round trip (`_script`). A label another owner
        # holds stays its own (one row, one holder).
        row = await self._script(
            [
                ("SELECT pg_advisory_xact_lock(hashtext(%s))", ("slot:" + backend,)),
                ("DELETE FROM slots WHERE backend = %s AND until < %s", (backend, now)),
                (
                    "INSERT INTO slots (backend, msg_id, owner, until) SELECT %s, %s, %s, %s"
                    " WHERE (SELECT COUNT(*) FROM slots WHERE backend = %s AND msg_id != %s) < %s"
                    " ON CONFLICT (backend, msg_id) DO UPDATE SET until = excluded.until"
                    " WHERE slots.owner = excluded.owner RETURNING 1",
                    (backend, msg_id, self.owner, now + self.lease, backend, msg_id, limit),
                ),
            ]
        )
        return row is not None

    async def release_slot(self, backend: str, msg_id: int) -> None:
        # one statement: a slot freed wakes the waiters on every node (delivered at commit)
        await self._exec(
            "WITH freed AS (DELETE FROM slots WHERE backend = %s AND msg_id = %s RETURNING 1)"
            " SELECT pg_notify(%s, %s) FROM freed",
            (backend, msg_id, SLOT_CHANNEL, backend),
        )

    async def pause_backend(self, backend: str, until: float, reason: str) -> None:
        await self._exec(
            "INSERT INTO pauses (backend, until, reason) VALUES (%s, %s, %s)"
            " ON CONFLICT (backend) DO UPDATE SET until = excluded.until,"
            " reason = excluded.reason",
            (backend, until, reason[:500]),
        )

    async def backend_pauses(self) -> dict[str, tuple[float, str]]:
        rows = await self._all(
            "SELECT backend, until, reason FROM pauses WHERE until > %s", (self.clock(),)
        )
        return {r["backend"]: (r["until"], r["reason"]) for r in rows}

    async def clear_pause(self, backend: str) -> None:
        await self._exec("DELETE FROM pauses WHERE backend = %s", (backend,))

    # -- inspection ------------------------------------------------------------------------------------

    async def counts(self) -> QueueCounts:
        async def go(conn: Conn) -> QueueCounts:
            by_state = {s.value: 0 for s in State}
            cur = await conn.execute("SELECT state, COUNT(*) AS n FROM messages GROUP BY state")
            for r in await cur.fetchall():
                by_state[r["state"]] = int(r["n"])
            cur = await conn.execute(
                "SELECT state, COUNT(*) AS n FROM outbox WHERE state IN ('pending', 'failed')"
                " GROUP BY state"
            )
            outbox = {r["state"]: int(r["n"]) for r in await cur.fetchall()}
            return QueueCounts(
                by_state=by_state,
                outbox_pending=outbox.get("pending", 0),
                outbox_failed=outbox.get("failed", 0),
            )

        return await self._run(go)

    async def oldest_pending(self) -> float | None:
        row = await self._one(
            "SELECT MIN(received_at) AS t FROM messages"
            " WHERE state IN ('queued', 'deferred', 'processing')"
        )
        return row["t"] if row else None

    async def list_messages(self, state: str | None = None, limit: int = 1000) -> list[MessageRow]:
        if state:
            rows = await self._all(
                f"SELECT {MSG_COLUMNS} FROM messages WHERE state = %s ORDER BY id LIMIT %s",
                (state, limit),
            )
        else:
            rows = await self._all(
                f"SELECT {MSG_COLUMNS} FROM messages ORDER BY id LIMIT %s", (limit,)
            )
        return [message_row(r) for r in rows]

    async def retry(self, msg_id: int | None = None, *, all_dead: bool = False) -> int:
        now = self.clock()

        async def go(conn: Conn) -> int:
            if all_dead:
                cur = await conn.execute(
                    "UPDATE messages SET state = 'queued', next_attempt_at = %s, attempts = 0,"
                    " first_attempt_at = NULL, updated_at = %s WHERE state = 'dead'",
                    (now, now),
                )
            else:
                cur = await conn.execute(
                    "UPDATE messages SET state = 'queued', next_attempt_at = %s, attempts = 0,"
                    " first_attempt_at = NULL, updated_at = %s WHERE id = %s"
                    " AND state IN ('dead', 'deferred', 'queued', 'suppressed')",
                    (now, now, msg_id),
                )
            if cur.rowcount:
                await conn.execute(f"NOTIFY {CHANNEL}")
            return cur.rowcount

        return await self._run(go)

    async def drop(self, msg_id: int) -> int:
        async def go(conn: Conn) -> int:
            await conn.execute(
                "DELETE FROM outbox WHERE message_id = %s AND state = 'pending'", (msg_id,)
            )
            cur = await conn.execute(
                "DELETE FROM messages WHERE id = %s AND state != 'processing'", (msg_id,)
            )
            return cur.rowcount

        return await self._run(go)

    async def stats(self) -> dict[str, Any]:
        now = self.clock()

        def age(t: float | None) -> float | None:
            return None if t is None else round(max(0.0, now - t), 1)

        async def go(conn: Conn) -> dict[str, Any]:
            states: dict[str, dict[str, Any]] = {
                s.value: {
                    "count": 0,
                    "bytes": 0,
                    "raw_bytes": 0,
                    "purged": 0,
                    "oldest_age_s": None,
                    "oldest_change_age_s": None,
                }
                for s in State
            }
            cur = await conn.execute(
                "SELECT state, COUNT(*) AS n, COALESCE(SUM(size), 0) AS b,"
                " COALESCE(SUM(CASE WHEN purged_at IS NULL THEN size ELSE 0 END), 0) AS rb,"
                " SUM(CASE WHEN purged_at IS NULL THEN 0 ELSE 1 END) AS p,"
                " MIN(received_at) AS r, MIN(updated_at) AS u FROM messages GROUP BY state"
            )
            for r in await cur.fetchall():
                states[r["state"]] = {
                    "count": int(r["n"]),
                    "bytes": int(r["b"]),
                    "raw_bytes": int(r["rb"]),
                    "purged": int(r["p"] or 0),
                    "oldest_age_s": age(r["r"]),
                    "oldest_change_age_s": age(r["u"]),
                }
            outbox: dict[str, dict[str, Any]] = {
                s: {"count": 0, "bytes": 0, "oldest_age_s": None}
                for s in ("pending", "sent", "failed")
            }
            cur = await conn.execute(
                "SELECT state, COUNT(*) AS n, COALESCE(SUM(LENGTH(data)), 0) AS b,"
                " MIN(created_at) AS c FROM outbox GROUP BY state"
            )
            for r in await cur.fetchall():
                outbox[r["state"]] = {
                    "count": int(r["n"]),
                    "bytes": int(r["b"]),
                    "oldest_age_s": age(r["c"]),
                }
            cur = await conn.execute("SELECT COUNT(*) AS n, MIN(created_at) AS c FROM tickets")
            tickets = await cur.fetchone()
            cur = await conn.execute("SELECT COUNT(*) AS n, MIN(created_at) AS c FROM threads")
            threads = await cur.fetchone()
            cur = await conn.execute("SELECT pg_database_size(current_database()) AS n")
            size = await cur.fetchone()
            assert tickets is not None and threads is not None and size is not None
            return {
                "schema_version": SCHEMA_VERSION,
                "engine": self.engine,
                "states": states,
                "raw_bytes": sum(v["raw_bytes"] for v in states.values()),
                "maps": {
                    "tickets": int(tickets["n"]),
                    "threads": int(threads["n"]),
                    "oldest_ticket_age_s": age(tickets["c"]),
                    "oldest_thread_age_s": age(threads["c"]),
                },
                "outbox": outbox,
                "files": {"database_bytes": int(size["n"])},
            }

        return await self._run(go)

    # -- data lifecycle ----------------------------------------------------------------------------------

    async def purge(self, policy: RetentionPolicy, *, pause: float = 0.0) -> PurgeResult:
        """See `Spool.purge` (the steps of `gateway.spool.retention`, in PostgreSQL's SQL)."""
        from gateway.spool import retention

        now = self.clock()
        day = retention.DAY
        maps_cut = now - policy.maps_days * day
        raw_days = {
            State.DONE: policy.done_raw_days,
            State.SUPPRESSED: policy.suppressed_raw_days,
            State.DUPLICATE: policy.duplicate_raw_days,
        }
        final = [s.value for s in retention.FINAL_RAW_STATES]
        steps: list[tuple[str, str, dict[str, Any]]] = [
            (
                f"raw:{s.value}",
                "WITH p AS (SELECT id, size FROM messages WHERE state = %(state)s"
                " AND updated_at < %(cut)s AND purged_at IS NULL LIMIT %(limit)s),"
                " d AS (DELETE FROM bodies WHERE id IN (SELECT id FROM p)),"
                " u AS (UPDATE messages SET purged_at = %(now)s WHERE id IN (SELECT id FROM p))"
                " SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS x FROM p",
                {"state": s.value, "cut": now - raw_days[s] * day, "now": now},
            )
            for s in retention.FINAL_RAW_STATES
        ]
        for kind, states, cut in (
            ("messages", final, maps_cut),
            ("dead", [State.DEAD.value], now - policy.dead_days * day),
        ):
            steps.append(
                (
                    kind,
                    "WITH p AS (SELECT id FROM messages WHERE state = ANY(%(states)s)"
                    " AND updated_at < %(cut)s LIMIT %(limit)s),"
                    " o AS (DELETE FROM outbox WHERE message_id IN (SELECT id FROM p) RETURNING 1),"
                    " d AS (DELETE FROM messages WHERE id IN (SELECT id FROM p))"
                    " SELECT (SELECT COUNT(*) FROM p) AS n, (SELECT COUNT(*) FROM o) AS x",
                    {"states": states, "cut": cut},
                )
            )
        steps += [
            (
                "threads",
                "WITH p AS (SELECT t.message_id FROM threads t WHERE t.created_at < %(cut)s"
                " AND NOT EXISTS (SELECT 1 FROM threads u WHERE u.backend = t.backend"
                "  AND u.ref = t.ref AND u.created_at >= %(cut)s)"
                " AND NOT EXISTS (SELECT 1 FROM tickets k WHERE k.backend = t.backend"
                "  AND k.ref = t.ref AND k.created_at >= %(cut)s) LIMIT %(limit)s),"
                " d AS (DELETE FROM threads WHERE message_id IN (SELECT message_id FROM p))"
                " SELECT COUNT(*) AS n, 0 AS x FROM p",
                {"cut": maps_cut},
            ),
            (
                "tickets",
                "WITH p AS (SELECT k.backend, k.ref FROM tickets k WHERE k.created_at < %(cut)s"
                " AND NOT EXISTS (SELECT 1 FROM threads t WHERE t.backend = k.backend"
                "  AND t.ref = k.ref AND t.created_at >= %(cut)s) LIMIT %(limit)s),"
                " d AS (DELETE FROM tickets WHERE (backend, ref) IN (SELECT backend, ref FROM p))"
                " SELECT COUNT(*) AS n, 0 AS x FROM p",
                {"cut": maps_cut},
            ),
            (
                "outbox",
                "WITH p AS (SELECT id FROM outbox WHERE state IN ('sent', 'failed')"
                " AND created_at < %(cut)s LIMIT %(limit)s),"
                " d AS (DELETE FROM outbox WHERE id IN (SELECT id FROM p))"
                " SELECT COUNT(*) AS n, 0 AS x FROM p",
                {"cut": now - policy.outbox_days * day},
            ),
        ]
        result = PurgeResult()
        for kind, query, params in steps:
            while True:
                row = await self._one(query, {**params, "limit": policy.batch})
                n, extra = (int(row["n"]), int(row["x"])) if row else (0, 0)
                retention.count(result, kind, n, extra)
                if n < policy.batch:
                    break
                await asyncio.sleep(pause)
        return result

    async def _scan(self, address: str, after: int) -> tuple[list[tuple[int, str, int]], int]:
        from gateway.spool import retention

        found: list[tuple[int, str, int]] = []
        last = after
        while True:
            rows = await self._all(
                "SELECT m.id, m.state, m.size, m.mail_from, m.rcpt_tos,"
                " substring(b.raw from 1 for %s) AS head"
                " FROM messages m LEFT JOIN bodies b ON b.id = m.id"
                " WHERE m.id > %s ORDER BY m.id LIMIT 200",
                (retention.HEAD_BYTES, last),
            )
            if not rows:
                return found, last
            for r in rows:
                head = bytes(r["head"]) if r["head"] is not None else None
                if (
                    head is not None
                    and len(head) == retention.HEAD_BYTES
                    and b"\n\n" not in head.replace(b"\r\n", b"\n")
                ):
                    head = await self.read_body(r["id"]) or head
                if retention.matches(address, r["mail_from"], r["rcpt_tos"], head):
                    found.append((r["id"], r["state"], r["size"]))
            last = rows[-1]["id"]

    async def _map_rows(
        self, conn: Conn, address: str, msg_ids: list[int]
    ) -> tuple[list[tuple[str, str]], list[str], list[int]]:
        cur = await conn.execute(
            "SELECT backend, ref FROM tickets WHERE LOWER(TRIM(requester)) = %s", (address,)
        )
        tickets = [(r["backend"], r["ref"]) for r in await cur.fetchall()]
        threads: set[str] = set()
        for backend, ref in tickets:
            cur = await conn.execute(
                "SELECT message_id FROM threads WHERE backend = %s AND ref = %s", (backend, ref)
            )
            threads |= {r["message_id"] for r in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT id FROM outbox WHERE LOWER(TRIM(rcpt)) = %s OR message_id = ANY(%s)",
            (address, msg_ids),
        )
        outbox = {r["id"] for r in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT t.message_id FROM threads t JOIN messages m ON m.message_id = t.message_id"
            " WHERE m.id = ANY(%s) AND m.message_id != ''",
            (msg_ids,),
        )
        threads |= {r["message_id"] for r in await cur.fetchall()}
        return tickets, sorted(threads), sorted(outbox)

    async def find_erasure(self, address: str) -> Erasure:
        address = address.strip().lower()
        found, last = await self._scan(address, 0)
        er = Erasure(address=address, scanned_to=last)
        for msg_id, state, size in found:
            if state == State.PROCESSING.value:
                er.busy.append(msg_id)
            else:
                er.message_ids.append(msg_id)
                er.raw_bytes += size
        tickets, threads, outbox = await self._run(
            lambda conn: self._map_rows(conn, address, er.message_ids)
        )
        er.tickets, er.threads, er.outbox = len(tickets), len(threads), len(outbox)
        return er

    async def erase(self, address: str, scanned: Erasure) -> Erasure:
        """See `Spool.erase`. Deleted rows stay in the table files until VACUUM FULL rewrites
        them (run here); copies in the server's WAL and in base backups are the DBA's to expire."""
        address = address.strip().lower()
        later, last = await self._scan(address, scanned.scanned_to)
        candidates = [*scanned.message_ids, *scanned.busy, *(r[0] for r in later)]

        async def go(conn: Conn) -> Erasure:
            er = Erasure(address=address, scanned_to=last)
            cur = await conn.execute(
                "SELECT id, state, size FROM messages WHERE id = ANY(%s) FOR UPDATE",
                (candidates,),
            )
            for r in await cur.fetchall():
                if r["state"] == State.PROCESSING.value:
                    er.busy.append(r["id"])
                else:
                    er.message_ids.append(r["id"])
                    er.raw_bytes += r["size"]
            tickets, threads, outbox = await self._map_rows(conn, address, er.message_ids)
            await conn.execute("DELETE FROM outbox WHERE id = ANY(%s)", (outbox,))
            await conn.execute("DELETE FROM threads WHERE message_id = ANY(%s)", (threads,))
            for backend, ref in tickets:
                await conn.execute(
                    "DELETE FROM tickets WHERE backend = %s AND ref = %s", (backend, ref)
                )
            await conn.execute("DELETE FROM messages WHERE id = ANY(%s)", (er.message_ids,))
            er.tickets, er.threads, er.outbox = len(tickets), len(threads), len(outbox)
            return er

        er = await self._run(go)
        try:
            async with self._pool.connection() as conn:  # autocommit: VACUUM needs it
                for table in DATA_TABLES:
                    await conn.execute(sql.SQL("VACUUM FULL {}").format(sql.Identifier(table)))
            er.compacted = True
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("erase_vacuum_failed", extra={"fields": {"error": str(exc)}})
            er.compacted = False
        return er

    async def backup(self, dest: Path) -> int:
        raise SpoolError("a PostgreSQL spool is backed up with the server's tools (pg_dump)")

    # -- `gateway spool copy` --------------------------------------------------------------------------

    async def is_empty(self) -> bool:
        async def go(conn: Conn) -> bool:
            for table in DATA_TABLES:
                cur = await conn.execute(
                    sql.SQL("SELECT EXISTS (SELECT 1 FROM {}) AS x").format(sql.Identifier(table))
                )
                row = await cur.fetchone()
                if row and row["x"]:
                    return False
            return True

        return await self._run(go)

    async def import_tables(
        self, tables: list[tuple[str, list[str], Iterable[tuple[Any, ...]]]]
    ) -> None:
        """COPY each (table, columns, rows) in, all in ONE transaction, then move the id
        sequences past the copied ids (`gateway spool copy`)."""

        async def go(conn: Conn) -> None:
            for table, columns, rows in tables:
                query = sql.SQL("COPY {} ({}) FROM STDIN").format(
                    sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
                )
                async with conn.cursor() as cur, cur.copy(query) as copy:
                    for row in rows:
                        await copy.write_row(row)
            for table in ("messages", "outbox"):
                await conn.execute(
                    sql.SQL(
                        "SELECT setval(pg_get_serial_sequence({t}, 'id'),"
                        " COALESCE((SELECT MAX(id) FROM {i}), 0) + 1, false)"
                    ).format(t=sql.Literal(table), i=sql.Identifier(table))
                )
            await conn.execute(f"NOTIFY {CHANNEL}")

        await self._run(go)


def _thread_insert(message_id: str, outcome: Outcome, now: float) -> tuple[str, tuple[Any, ...]]:
    return (
        "INSERT INTO threads (message_id, backend, ref, created_at)"
        " VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
        (message_id, outcome.backend, outcome.ticket_ref, now),
    )


def _ack_verdict_sql(
    limits: AckLimits, sender_key: str, domain: str, since: float
) -> tuple[str, tuple[Any, ...]]:
    """An SQL expression over `known` (a boolean column beside it): the hourly limit an
    acknowledgement would pass ("sender", "domain", "global"), or "". The steps are
    `ack_limit_steps`' for a known sender and for a stranger, checked in their order."""

    def case(known: bool) -> tuple[str, list[Any]]:
        whens: list[str] = []
        args: list[Any] = []
        for step in ack_limit_steps(limits, sender_key, domain, known):
            if step.most <= 0:
                whens.append("WHEN TRUE THEN %s")
                args.append(step.verdict)
                break
            where = f"{step.column} = %s" if step.column else "TRUE"
            whens.append(
                f"WHEN (SELECT COUNT(*) FROM outbox WHERE {where} AND created_at >= %s) >= %s"
                " THEN %s"
            )
            args += [*((step.value,) if step.column else ()), since, step.most, step.verdict]
        return "CASE " + " ".join(whens) + " ELSE '' END", args

    known_sql, known_args = case(True)
    stranger_sql, stranger_args = case(False)
    return (
        f"CASE WHEN known THEN {known_sql} ELSE {stranger_sql} END",
        (*known_args, *stranger_args),
    )
