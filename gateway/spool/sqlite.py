"""The embedded spool: one SQLite file in WAL mode with synchronous=FULL. See `Spool`.

Durability with speed comes from group commit: every write goes through one writer thread that
owns the only write connection. It takes the first waiting job, then every job that queued up
meanwhile, runs them all in one transaction (a savepoint each, so one failing job fails alone) and
commits once: one fsync for the whole batch. Each caller's future resolves only after that commit,
so an SMTP `250` is never said for a mail that is not on disk. That is the only write path.
Reads run on a small pool of reader threads with a connection each and never wait for the writer
(WAL); nothing touches the database on the event loop's own thread.

Crash recovery (`recover`, at start-up of a worker process): messages its owner name left
`processing` are put back to `queued`; the ones whose backend create call was begun but not
recorded done (`inflight`) are flagged `uncertain`, so the worker looks for the ticket before
creating it again. Several worker processes (`[gateway] worker_processes`) share the file: each
claims under its own owner name and lease (see `Spool`).

The schema, its version and the migrations of an older spool live in `gateway.spool.migrations`
(run when the spool is opened); retention, statistics and erasure in `gateway.spool.retention`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import SpoolError
from gateway.models import Envelope
from gateway.spool import migrations, retention
from gateway.spool.base import (
    BLOB_STREAM_MIN,
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
    State,
    ThreadHit,
    TicketInfo,
)
from gateway.spool.migrations import SCHEMA, SCHEMA_VERSION
from gateway.spool.rows import (
    MSG_COLUMNS,
    ack_limit_steps,
    ack_row,
    copy_going_first,
    message_row,
    node_info,
    pick_ticket,
)

__all__ = ["BLOB_STREAM_MIN", "SCHEMA", "SCHEMA_VERSION", "SqliteSpool"]

log = logging.getLogger("gateway.spool")

T = TypeVar("T")

BLOB_CHUNK = 1 << 18
SOURCE_KEYS_PER_QUERY = 500  # parameters of one IN (...) look-up (SQLite allows 32,766)


def read_body(conn: sqlite3.Connection, msg_id: int) -> bytes | None:
    """The raw bytes of a message, None once purged. A big one is read in place by incremental
    blob I/O, not assembled by SQLite and then copied again into Python."""
    r = conn.execute(
        "SELECT length(raw), CASE WHEN length(raw) <= ? THEN raw END FROM bodies WHERE id = ?",
        (BLOB_STREAM_MIN, msg_id),
    ).fetchone()
    if r is None:
        return None
    if r[1] is not None:
        return bytes(r[1])
    with conn.blobopen("bodies", "raw", msg_id, readonly=True) as blob:
        return blob.read()


class BodyReader:
    """A message's raw bytes read in pieces from the spool (a `gateway.models.RawSource`)."""

    def __init__(self, conn: sqlite3.Connection, blob: sqlite3.Blob) -> None:
        self._conn, self._blob = conn, blob
        self.size = len(blob)

    def read(self, offset: int, length: int) -> bytes:
        self._blob.seek(offset)
        return self._blob.read(length)

    def close(self) -> None:
        self._blob.close()
        self._conn.close()


class _Job:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.fn = fn
        self.future: Future[Any] = Future()


class SqliteSpool:
    """See `Spool`. `clock` is injectable so retention and retry tests control time."""

    engine = "sqlite"
    signals = False  # no signal between processes: see on_work, on_slot_freed

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        max_batch: int = 512,
        synchronous: str = "FULL",
        node: str = "localhost",
        worker: int = 0,
        lease: float = 30.0,
        read_only: bool = False,
        readers: int = 2,
    ) -> None:
        """`synchronous`: FULL (default) fsyncs every commit: what intake needs before it says
        yes. The worker process opens the spool with NORMAL: its commits (progress, outcomes)
        survive a crash of any process (the WAL is in the kernel's cache at commit) and reach
        the disk with the next FULL commit or checkpoint; only a power loss in between can lose
        them, and then a mail is processed again (a possible duplicate, never a loss: its raw
        bytes were committed FULL by the intake). It keeps the shared write lock short.

        `read_only` (the dry run): no writer, no schema created or migrated; an absent file or
        another schema version is a `SpoolError`."""
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.synchronous = synchronous
        self.path = Path(path)
        self.clock = clock
        self.max_batch = max_batch
        self.node = node
        self.owner = f"{node}/{worker}"
        self.worker = worker
        self._owner_fd: int | None = None
        self.lease = lease
        self.read_only = read_only
        self._started_at = clock()
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []  # the readers' connections, closed at close
        self._conns_lock = threading.Lock()
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="spool-read")
        self._closed = False
        self._put_queue: list[tuple[Any, asyncio.Future[PutResult]]] = []
        self._put_inflight = False
        self.commits = 0  # for the benchmarks: how many fsyncs served how many puts
        self.puts = 0
        self._writer: threading.Thread | None = None
        if read_only:
            self.opened_version = self._check_read_only()
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._wconn = self._connect()
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: cannot open spool: {exc}") from exc
        try:
            # create a new spool, or migrate an older one after a backup copy (see migrations)
            self.opened_version = migrations.prepare(self._wconn, self.path)
        except (sqlite3.Error, SpoolError) as exc:
            self._wconn.close()
            if isinstance(exc, SpoolError):
                raise
            raise SpoolError(f"{self.path}: cannot open spool: {exc}") from exc
        self._wconn.execute("PRAGMA busy_timeout=0")  # the writer waits in _begin instead
        self._writer = threading.Thread(target=self._write_loop, name="spool-writer", daemon=True)
        self._writer.start()

    def _check_read_only(self) -> int:
        if not self.path.exists():
            raise SpoolError(f"{self.path}: no spool")
        try:
            version = migrations.read_version(self._reader())
        except sqlite3.Error as exc:
            raise SpoolError(f"{self.path}: cannot read spool: {exc}") from exc
        if version != SCHEMA_VERSION:
            raise SpoolError(f"{self.path}: spool schema {version}, expected {SCHEMA_VERSION}")
        return version

    # -- connections -------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            conn = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA busy_timeout=30000")
            return conn
        conn = sqlite3.connect(
            self.path, timeout=30.0, isolation_level=None, check_same_thread=False
        )
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=30000")
        return conn

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._conns_lock:
                self._conns.append(conn)
        return conn

    # -- the writer thread: group commit -------------------------------------------------------

    def _write_loop(self) -> None:
        conn = self._wconn
        while True:
            first = self._jobs.get()
            if first is None:
                break
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._run_batch(conn, batch)
            if stop:
                break
        conn.close()

    @staticmethod
    def _begin(conn: sqlite3.Connection, timeout: float = 30.0) -> None:
        """BEGIN IMMEDIATE, waiting for the other process's write lock in short steps.

        The intake and the worker processes share the file. SQLite's own busy handler sleeps in
        steps of 1 to 100 ms, far longer than the other side holds the lock (well under a
        millisecond), and every such sleep would be added to an SMTP client's wait for `250`.
        """
        deadline = time.monotonic() + timeout
        pause = 0.0001
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.002)

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Job]) -> None:
        results: list[tuple[_Job, bool, Any]] = []
        try:
            self._begin(conn)
            for job in batch:
                conn.execute("SAVEPOINT job")
                try:
                    value = job.fn(conn)
                except Exception as exc:  # one job failing must not fail its batch-mates
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((job, False, exc))
                else:
                    conn.execute("RELEASE job")
                    results.append((job, True, value))
            conn.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            log.error(
                "spool_commit_failed", extra={"fields": {"error": str(exc), "batch": len(batch)}}
            )
            err = SpoolError(f"spool commit failed: {exc}")
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(err)
            return
        for job, ok, value in results:
            if job.future.cancelled():  # the caller gave up waiting; the write stands
                continue
            if ok:
                job.future.set_result(value)
            elif isinstance(value, sqlite3.Error):
                job.future.set_exception(SpoolError(f"spool write failed: {value}"))
            else:
                job.future.set_exception(value)

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` in the writer's next group commit. Keep `fn` short: intake waits for
        the batch it shares."""
        if self._closed or self._writer is None:
            raise SpoolError("spool is closed" if self._closed else "spool is read-only")
        job = _Job(fn)
        self._jobs.put(job)
        return await asyncio.wrap_future(job.future)  # type: ignore[no-any-return, unused-ignore]

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(conn)` on a reader thread's connection (a WAL reader never waits for the
        writer, and nothing blocks the event loop)."""
        if self._closed:
            raise SpoolError("spool is closed")

        def run() -> T:
            try:
                return fn(self._reader())
            except sqlite3.Error as exc:
                raise SpoolError(f"spool read failed: {exc}") from exc

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, run)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._jobs.put(None)
            await asyncio.to_thread(self._writer.join, 30)
        self._readers.shutdown(wait=True)
        with self._conns_lock:
            for conn in self._conns:
                conn.close()
            self._conns.clear()
        if self._owner_fd is not None:
            os.close(self._owner_fd)  # the lock goes with it
            self._owner_fd = None

    # -- intake ---------------------------------------------------------------------------------

    async def put(
        self, raw: bytes, envelope: Envelope, *, source_key: str | None = None
    ) -> PutResult:
        """See `Spool.put`. Puts that arrive while a batch is being committed wait and go
        together in the next one: one thread hand-off and one fsync per batch, not per mail."""
        if self._closed or self._writer is None:
            raise SpoolError("spool is closed" if self._closed else "spool is read-only")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[PutResult] = loop.create_future()
        self._put_queue.append((self._insert(raw, envelope, source_key), fut))
        if not self._put_inflight:
            self._flush_puts(loop)
        result = await fut
        self.puts += 1
        return result

    def _insert(
        self, raw: bytes, envelope: Envelope, source_key: str | None
    ) -> Callable[[sqlite3.Connection], PutResult]:
        now = self.clock()
        received = envelope.received_at or now
        big = len(raw) > BLOB_STREAM_MIN
        row = (
            State.QUEUED.value,
            envelope.intake,
            envelope.mail_from,
            json.dumps(list(envelope.rcpt_tos)),
            envelope.peer,
            received,
            len(raw),
            source_key,
            0.0,
            now,
        )

        def job(conn: sqlite3.Connection) -> PutResult:
            if source_key is not None:
                found = conn.execute(
                    "SELECT id FROM messages WHERE source_key = ?", (source_key,)
                ).fetchone()
                if found is not None:
                    return PutResult(id=found[0], duplicate=True)
            cur = conn.execute(
                "INSERT INTO messages (state, intake, mail_from, rcpt_tos, peer, received_at,"
                " size, source_key, next_attempt_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            msg_id = cur.lastrowid
            assert msg_id is not None
            if not big:
                conn.execute("INSERT INTO bodies (id, raw) VALUES (?, ?)", (msg_id, raw))
            else:
                # in pieces by incremental blob I/O: binding it would make SQLite copy it whole
                conn.execute(
                    "INSERT INTO bodies (id, raw) VALUES (?, zeroblob(?))", (msg_id, len(raw))
                )
                view = memoryview(raw)
                with conn.blobopen("bodies", "raw", msg_id) as blob:
                    for start in range(0, len(view), BLOB_CHUNK):
                        blob.write(view[start : start + BLOB_CHUNK])
            return PutResult(id=msg_id)

        return job

    def _flush_puts(self, loop: asyncio.AbstractEventLoop) -> None:
        batch, self._put_queue = self._put_queue, []
        if not batch or self._closed:
            self._put_inflight = False
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(SpoolError("spool is closed"))
            return
        self._put_inflight = True

        def job(conn: sqlite3.Connection) -> list[tuple[bool, Any]]:
            out: list[tuple[bool, Any]] = []
            for insert, _ in batch:
                conn.execute("SAVEPOINT put")
                try:
                    out.append((True, insert(conn)))
                except sqlite3.Error as exc:
                    conn.execute("ROLLBACK TO put")
                    out.append((False, SpoolError(f"spool write failed: {exc}")))
                conn.execute("RELEASE put")
            return out

        handle = _Job(job)
        handle.future.add_done_callback(
            lambda cf: loop.call_soon_threadsafe(self._puts_done, loop, batch, cf)
        )
        self._jobs.put(handle)

    def _puts_done(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[Any, asyncio.Future[PutResult]]],
        cf: Future[Any],
    ) -> None:
        exc = cf.exception()
        if exc is not None:
            err = exc if isinstance(exc, SpoolError) else SpoolError(f"spool write failed: {exc}")
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(err)
        else:
            for (ok, value), (_, fut) in zip(cf.result(), batch, strict=True):
                if fut.done():
                    continue
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)
        self._flush_puts(loop)  # what arrived meanwhile is the next batch

    async def has_source_key(self, source_key: str) -> bool:
        return source_key in await self.known_source_keys([source_key])

    async def known_source_keys(self, source_keys: Collection[str]) -> set[str]:
        keys = list(dict.fromkeys(source_keys))
        if not keys:
            return set()

        def q(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(keys), SOURCE_KEYS_PER_QUERY):
                part = keys[start : start + SOURCE_KEYS_PER_QUERY]
                marks = ",".join("?" * len(part))
                rows = conn.execute(
                    f"SELECT source_key FROM messages WHERE source_key IN ({marks})", part
                ).fetchall()
                found.update(row[0] for row in rows)
            return found

        return await self._read(q)

    # -- recovery, claims and leases --------------------------------------------------------------

    async def hold_owner(self) -> None:
        """See `Spool.hold_owner`: an flock on `<spool>.worker.lock` (`.worker<N>.lock` for the
        N-th worker process), dropped by the kernel when the process dies."""
        suffix = "" if self.worker == 0 else str(self.worker)
        lock_path = f"{self.path}.worker{suffix}.lock"

        def take() -> int:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("waiting_for_owner_lock", extra={"fields": {"path": lock_path}})
                fcntl.flock(fd, fcntl.LOCK_EX)
            return fd

        if self._owner_fd is None:
            self._owner_fd = await asyncio.to_thread(take)

    async def recover(self) -> Recovered:
        """See `Spool.recover`."""
        owner = self.owner

        def job(conn: sqlite3.Connection) -> Recovered:
            # the call slots of this owner's previous process (this one holds none yet)
            conn.execute("DELETE FROM slots WHERE owner = ?", (owner,))
            # '' : claimed before claims had owners (a spool of schema 4 or older)
            return self._requeue(conn, "claimed_by IN (?, '')", [owner], crashed=True)

        return await self._write(job)

    async def take_over(self) -> Recovered:
        """See `Spool.take_over`."""
        now = self.clock()
        return await self._write(
            lambda conn: self._requeue(
                conn, "lease_until IS NOT NULL AND lease_until < ?", [now], crashed=True
            )
        )

    async def release(self, ids: list[int]) -> Recovered:
        """Put back mails a clean shutdown cut short (not a crash: no crash is counted)."""
        if not ids:
            return Recovered()
        marks = ",".join("?" * len(ids))
        return await self._write(
            lambda conn: self._requeue(conn, f"id IN ({marks})", list(ids), crashed=False)
        )

    def _requeue(
        self, conn: sqlite3.Connection, cond: str, params: list[Any], *, crashed: bool
    ) -> Recovered:
        now = self.clock()
        where = f"state = 'processing' AND {cond}"
        unc = conn.execute(
            f"UPDATE messages SET uncertain = 1, last_error = ? WHERE {where} AND inflight != ''",
            ("interrupted during a backend call: the ticket system may already have it", *params),
        ).rowcount
        n = conn.execute(
            "UPDATE messages SET state = 'queued', inflight = '', next_attempt_at = ?,"
            " claimed_by = '', lease_until = NULL,"
            f" crashes = crashes + ?, updated_at = ? WHERE {where}",
            (now, 1 if crashed else 0, now, *params),
        ).rowcount
        return Recovered(requeued=n, uncertain=unc)

    async def heartbeat(
        self, claims: Collection[int] | None = None, *, slots: Collection[int] | None = None
    ) -> None:
        now = self.clock()
        until = now + self.lease
        ids = None if claims is None else [int(i) for i in claims]
        labels = ids if slots is None else [int(i) for i in slots]

        def job(conn: sqlite3.Connection) -> None:
            where = "state = 'processing' AND claimed_by = ?"
            params: list[Any] = [until, self.owner]
            if ids is not None:
                where += f" AND id IN ({','.join('?' * len(ids))})"
                params += ids
            conn.execute(f"UPDATE messages SET lease_until = ? WHERE {where}", params)
            conn.execute(
                "UPDATE outbox SET lease_until = ? WHERE state = 'pending' AND claimed_by = ?",
                (until, self.owner),
            )
            if labels is None:
                conn.execute("UPDATE slots SET until = ? WHERE owner = ?", (until, self.owner))
            elif labels:
                conn.execute(
                    f"UPDATE slots SET until = ? WHERE owner = ? AND msg_id IN"
                    f" ({','.join('?' * len(labels))})",
                    [until, self.owner, *labels],
                )
            conn.execute(
                "INSERT INTO nodes (owner, node, seen_at, started_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (owner) DO UPDATE SET seen_at = excluded.seen_at,"
                " node = excluded.node",
                (self.owner, self.node, now, self._started_at),
            )

        await self._write(job)

    async def nodes(self, within: float) -> list[NodeInfo]:
        since = self.clock() - within

        def q(conn: sqlite3.Connection) -> list[NodeInfo]:
            return [
                node_info(r)
                for r in conn.execute(
                    "SELECT owner, node, seen_at, started_at, (SELECT COUNT(*) FROM messages m"
                    "  WHERE m.state = 'processing' AND m.claimed_by = nodes.owner) AS claims"
                    " FROM nodes WHERE seen_at >= ? ORDER BY owner",
                    (since,),
                )
            ]

        return await self._read(q)

    async def claim_due(self, limit: int) -> list[int]:
        """See `Spool.claim_due`. One writer at a time: two owners never get the same rows."""
        now = self.clock()

        def job(conn: sqlite3.Connection) -> list[int]:
            ids = [
                r[0]
                for r in conn.execute(
                    "SELECT id FROM messages WHERE state IN ('queued', 'deferred')"
                    " AND next_attempt_at <= ? ORDER BY next_attempt_at, id LIMIT ?",
                    (now, limit),
                )
            ]
            if ids:
                conn.executemany(
                    "UPDATE messages SET state = 'processing', attempts = attempts + 1,"
                    " first_attempt_at = COALESCE(first_attempt_at, ?), updated_at = ?,"
                    " claimed_by = ?, lease_until = ? WHERE id = ?",
                    [(now, now, self.owner, now + self.lease, i) for i in ids],
                )
            return ids

        return await self._write(job)

    async def next_due_at(self) -> float | None:
        def q(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(next_attempt_at) FROM messages WHERE state IN ('queued', 'deferred')"
            ).fetchone()
            return row[0] if row and row[0] is not None else None

        return await self._read(q)

    def on_work(self, callback: Callable[[], None]) -> None:
        """No signal between processes here: the intake wakes its worker itself (workerproc)."""

    def on_slot_freed(self, callback: Callable[[str], None]) -> None:
        """No signal between processes here: a worker process polls for a slot of another."""

    async def load(self, msg_id: int, *, with_raw: bool = True) -> MessageRow | None:
        def q(conn: sqlite3.Connection) -> MessageRow | None:
            r = conn.execute(
                f"SELECT {MSG_COLUMNS} FROM messages WHERE id = ?", (msg_id,)
            ).fetchone()
            if r is None:
                return None
            return message_row(r, read_body(conn, msg_id) if with_raw else None)

        return await self._read(q)

    async def read_body(self, msg_id: int) -> bytes | None:
        """The raw bytes of a message, None once purged."""
        return await self._read(lambda conn: read_body(conn, msg_id))

    async def open_body(self, msg_id: int) -> BodyReader | None:
        """See `Spool.open_body`. Each on a connection of its own: an open blob holds a read
        snapshot, which neither the other reads nor the next big mail may share. Close it soon:
        it also holds back WAL checkpoints."""

        def open_() -> BodyReader | None:
            conn = self._connect()
            try:
                blob = conn.blobopen("bodies", "raw", msg_id, readonly=True)
            except sqlite3.OperationalError:  # no such row: purged
                conn.close()
                return None
            return BodyReader(conn, blob)

        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._readers, open_)

    async def set_identity(
        self, msg_id: int, message_id: str, digest: str, subject: str
    ) -> int | None:
        """See `Spool.set_identity`. Done in the writer so that it is atomic."""

        def job(conn: sqlite3.Connection) -> int | None:
            conn.execute(
                "UPDATE messages SET message_id = ?, digest = ?, subject = ? WHERE id = ?",
                (message_id, digest, subject[:500], msg_id),
            )
            row = conn.execute(
                "SELECT id, state FROM messages WHERE digest = ? AND message_id = ? AND id != ?"
                " AND state NOT IN ('dead', 'duplicate') ORDER BY id LIMIT 1",
                (digest, message_id, msg_id),
            ).fetchone()
            return copy_going_first(msg_id, row)

        return await self._write(job)

    async def state_of(self, msg_id: int) -> str | None:
        def q(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT state FROM messages WHERE id = ?", (msg_id,)).fetchone()
            return row[0] if row else None

        return await self._read(q)

    async def begin_step(
        self, msg_id: int, step: str, *, progress: dict[str, Any] | None = None
    ) -> None:
        done = None if progress is None else json.dumps(progress)

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE messages SET progress = COALESCE(?, progress), inflight = ? WHERE id = ?",
                (done, step, msg_id),
            )

        await self._write(job)

    async def done_step(self, msg_id: int, progress: dict[str, Any]) -> None:
        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE messages SET progress = ?, inflight = '' WHERE id = ?",
                (json.dumps(progress), msg_id),
            )

        await self._write(job)

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

        def job(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE messages SET state = 'deferred', last_error = ?, next_attempt_at = ?,"
                # a create call that failed in flight (timeout) may still have made the ticket
                " uncertain = CASE WHEN inflight != '' THEN 1 ELSE uncertain END,"
                " inflight = '', backend = CASE WHEN ? != '' THEN ? ELSE backend END,"
                " attempts = attempts - ?, updated_at = ?, claimed_by = '', lease_until = NULL"
                " WHERE id = ?",
                (
                    error[:4000],
                    now + delay,
                    backend,
                    backend,
                    0 if count_attempt else 1,
                    now,
                    msg_id,
                ),
            )

        await self._write(job)

    async def release_deferred(self, backend: str) -> int:
        now = self.clock()

        def job(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "UPDATE messages SET next_attempt_at = ? WHERE state = 'deferred'"
                " AND backend = ? AND next_attempt_at > ?",
                (now, backend, now),
            ).rowcount

        return await self._write(job)

    async def finish(self, msg_id: int, outcome: Outcome) -> str:
        now = self.clock()

        def job(conn: sqlite3.Connection) -> str:
            conn.execute(
                "UPDATE messages SET state = ?, last_error = ?, backend = ?, rule = ?, action = ?,"
                " ticket_ref = ?, ticket_id = ?, inflight = '', next_attempt_at = 0,"
                " claimed_by = '', lease_until = NULL, updated_at = ? WHERE id = ?",
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
            if outcome.state == State.DONE and outcome.ticket_ref:
                conn.execute(
                    "INSERT OR IGNORE INTO tickets (backend, ref, system, ticket_id, requester,"
                    " subject, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
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
                if outcome.message_id:
                    conn.execute(
                        "INSERT OR IGNORE INTO threads (message_id, backend, ref, created_at)"
                        " VALUES (?, ?, ?, ?)",
                        (outcome.message_id, outcome.backend, outcome.ticket_ref, now),
                    )
            ack = outcome.ack
            if ack is None:
                return ""
            rcpt = ack.rcpt.lower()
            sender_key = ack.sender_key or rcpt
            domain = ack.domain or rcpt.rpartition("@")[2]
            # a sender with a ticket conversation from before this mail
            known = (
                conn.execute(
                    "SELECT 1 FROM tickets WHERE requester = ? AND created_at < ? LIMIT 1",
                    (rcpt, now),
                ).fetchone()
                is not None
            )
            if ack.limits is not None:
                withheld = _ack_limited(conn, ack.limits, sender_key, domain, known, now - 3600)
                if withheld:
                    return withheld
            conn.execute(
                "INSERT INTO outbox (message_id, rcpt, mail_from, data, state, created_at,"
                " next_attempt_at, sender_key, domain, known)"
                " VALUES (?, ?, ?, ?, 'pending', ?, 0, ?, ?, ?)",
                (msg_id, rcpt, ack.mail_from, ack.data, now, sender_key, domain, int(known)),
            )
            if ack.message_id and outcome.ticket_ref:
                conn.execute(
                    "INSERT OR IGNORE INTO threads (message_id, backend, ref, created_at)"
                    " VALUES (?, ?, ?, ?)",
                    (ack.message_id, outcome.backend, outcome.ticket_ref, now),
                )
            return ""

        return await self._write(job)

    # -- ticket and thread maps -------------------------------------------------------------------

    async def ticket_by_ref(
        self, ref: str, *, prefer_backend: str | None = None
    ) -> TicketInfo | None:
        return await self._read(lambda conn: ticket_by_ref(conn, ref, prefer_backend))

    async def thread_lookup(self, message_ids: list[str]) -> ThreadHit | None:
        if not message_ids:
            return None
        return await self._read(lambda conn: thread_lookup(conn, message_ids))

    async def pending_original(self, message_ids: list[str], before_id: int) -> int | None:
        if not message_ids:
            return None

        def q(conn: sqlite3.Connection) -> int | None:
            marks = ",".join("?" * len(message_ids))
            r = conn.execute(
                f"SELECT id FROM messages WHERE message_id IN ({marks}) AND id < ?"
                " AND state IN ('queued', 'deferred', 'processing') ORDER BY id LIMIT 1",
                [*message_ids, before_id],
            ).fetchone()
            return int(r[0]) if r else None

        return await self._read(q)

    # -- outbox -----------------------------------------------------------------------------------

    async def acks_since(self, sender_key: str | None, since: float) -> int:
        def q(conn: sqlite3.Connection) -> int:
            if sender_key is None:
                r = conn.execute(
                    "SELECT COUNT(*) FROM outbox WHERE created_at >= ?", (since,)
                ).fetchone()
            else:
                r = conn.execute(
                    "SELECT COUNT(*) FROM outbox WHERE sender_key = ? AND created_at >= ?",
                    (sender_key.lower(), since),
                ).fetchone()
            return int(r[0])

        return await self._read(q)

    async def due_acks(self, limit: int = 50) -> list[AckRow]:
        """See `Spool.due_acks`: claimed for this owner, so that two senders never send one."""
        now = self.clock()

        def job(conn: sqlite3.Connection) -> list[AckRow]:
            rows = conn.execute(
                "SELECT * FROM outbox WHERE state = 'pending' AND next_attempt_at <= ?"
                " AND (claimed_by = ? OR claimed_by = '' OR lease_until < ?)"
                " ORDER BY id LIMIT ?",
                (now, self.owner, now, limit),
            ).fetchall()
            conn.executemany(
                "UPDATE outbox SET claimed_by = ?, lease_until = ? WHERE id = ?",
                [(self.owner, now + self.lease, r["id"]) for r in rows],
            )
            return [ack_row(r) for r in rows]

        return await self._write(job)

    async def ack_result(
        self, ack_id: int, *, sent: bool, error: str = "", retry_in: float | None = None
    ) -> None:
        now = self.clock()

        def job(conn: sqlite3.Connection) -> None:
            if sent:
                conn.execute(
                    "UPDATE outbox SET state = 'sent', sent_at = ?, attempts = attempts + 1,"
                    " claimed_by = '', lease_until = NULL WHERE id = ?",
                    (now, ack_id),
                )
            elif retry_in is None:
                conn.execute(
                    "UPDATE outbox SET state = 'failed', last_error = ?, attempts = attempts + 1,"
                    " claimed_by = '', lease_until = NULL WHERE id = ?",
                    (error[:2000], ack_id),
                )
            else:
                conn.execute(
                    "UPDATE outbox SET last_error = ?, attempts = attempts + 1,"
                    " next_attempt_at = ?, claimed_by = '', lease_until = NULL WHERE id = ?",
                    (error[:2000], now + retry_in, ack_id),
                )

        await self._write(job)

    # -- named leases, backend slots and pauses ---------------------------------------------------

    async def try_lease(self, name: str, seconds: float) -> bool:
        now = self.clock()

        def job(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "INSERT INTO leases (name, owner, until) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, until = excluded.until"
                " WHERE leases.owner = excluded.owner OR leases.until < ?",
                (name, self.owner, now + seconds, now),
            )
            return cur.rowcount > 0

        return await self._write(job)

    async def drop_lease(self, name: str) -> None:
        await self._write(
            lambda conn: conn.execute(
                "DELETE FROM leases WHERE name = ? AND owner = ?", (name, self.owner)
            )
        )

    async def acquire_slot(self, backend: str, limit: int, msg_id: int) -> bool:
        now = self.clock()

        def job(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM slots WHERE backend = ? AND until < ?", (backend, now))
            taken = conn.execute(
                "SELECT COUNT(*) FROM slots WHERE backend = ? AND msg_id != ?", (backend, msg_id)
            ).fetchone()[0]
            if taken >= limit:
                return False
            # a label another owner holds stays its own (one row, one holder)
            return (
                conn.execute(
                    "INSERT INTO slots (backend, msg_id, owner, until) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT (backend, msg_id) DO UPDATE SET until = excluded.until"
                    " WHERE slots.owner = excluded.owner",
                    (backend, msg_id, self.owner, now + self.lease),
                ).rowcount
                > 0
            )

        return await self._write(job)

    async def release_slot(self, backend: str, msg_id: int) -> None:
        await self._write(
            lambda conn: conn.execute(
                "DELETE FROM slots WHERE backend = ? AND msg_id = ?", (backend, msg_id)
            )
        )

    async def pause_backend(self, backend: str, until: float, reason: str) -> None:
        await self._write(
            lambda conn: conn.execute(
                "INSERT OR REPLACE INTO pauses (backend, until, reason) VALUES (?, ?, ?)",
                (backend, until, reason[:500]),
            )
        )

    async def backend_pauses(self) -> dict[str, tuple[float, str]]:
        now = self.clock()

        def q(conn: sqlite3.Connection) -> dict[str, tuple[float, str]]:
            return {
                r[0]: (r[1], r[2])
                for r in conn.execute(
                    "SELECT backend, until, reason FROM pauses WHERE until > ?", (now,)
                )
            }

        return await self._read(q)

    async def clear_pause(self, backend: str) -> None:
        await self._write(
            lambda conn: conn.execute("DELETE FROM pauses WHERE backend = ?", (backend,))
        )

    # -- inspection (CLI, health, metrics) ---------------------------------------------------------

    async def counts(self) -> QueueCounts:
        def q(conn: sqlite3.Connection) -> QueueCounts:
            by_state = {s.value: 0 for s in State}
            for r in conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state"):
                by_state[r[0]] = r[1]
            outbox = dict(
                conn.execute(
                    "SELECT state, COUNT(*) FROM outbox WHERE state IN ('pending', 'failed')"
                    " GROUP BY state"
                ).fetchall()
            )
            return QueueCounts(
                by_state=by_state,
                outbox_pending=outbox.get("pending", 0),
                outbox_failed=outbox.get("failed", 0),
            )

        return await self._read(q)

    async def oldest_pending(self) -> float | None:
        def q(conn: sqlite3.Connection) -> float | None:
            r = conn.execute(
                "SELECT MIN(received_at) FROM messages"
                " WHERE state IN ('queued', 'deferred', 'processing')"
            ).fetchone()
            return r[0] if r and r[0] is not None else None

        return await self._read(q)

    async def list_messages(self, state: str | None = None, limit: int = 1000) -> list[MessageRow]:
        def q(conn: sqlite3.Connection) -> list[MessageRow]:
            if state:
                rows = conn.execute(
                    f"SELECT {MSG_COLUMNS} FROM messages WHERE state = ? ORDER BY id LIMIT ?",
                    (state, limit),
                )
            else:
                rows = conn.execute(
                    f"SELECT {MSG_COLUMNS} FROM messages ORDER BY id LIMIT ?", (limit,)
                )
            return [message_row(r) for r in rows]

        return await self._read(q)

    async def retry(self, msg_id: int | None = None, *, all_dead: bool = False) -> int:
        now = self.clock()

        def job(conn: sqlite3.Connection) -> int:
            if all_dead:
                return conn.execute(
                    "UPDATE messages SET state = 'queued', next_attempt_at = ?, attempts = 0,"
                    " first_attempt_at = NULL, updated_at = ? WHERE state = 'dead'",
                    (now, now),
                ).rowcount
            return conn.execute(
                "UPDATE messages SET state = 'queued', next_attempt_at = ?, attempts = 0,"
                " first_attempt_at = NULL, updated_at = ?"
                " WHERE id = ? AND state IN ('dead', 'deferred', 'queued', 'suppressed')",
                (now, now, msg_id),
            ).rowcount

        return await self._write(job)

    async def drop(self, msg_id: int) -> int:
        def job(conn: sqlite3.Connection) -> int:
            conn.execute("DELETE FROM outbox WHERE message_id = ? AND state = 'pending'", (msg_id,))
            n = conn.execute(
                "DELETE FROM messages WHERE id = ? AND state != 'processing'", (msg_id,)
            ).rowcount
            if n:
                conn.execute("DELETE FROM bodies WHERE id = ?", (msg_id,))
            return n

        return await self._write(job)

    async def stats(self) -> dict[str, Any]:
        now = self.clock()
        out = await self._read(lambda conn: retention.stats(conn, now, self.path))
        out["engine"] = self.engine
        return out

    # -- data lifecycle ----------------------------------------------------------------------------

    async def purge(self, policy: RetentionPolicy, *, pause: float = 0.0) -> PurgeResult:
        """See `Spool.purge`: each batch is one job of the writer (intake shares its commit)."""
        result = PurgeResult()
        for name, step in retention.sqlite_steps(policy, self.clock()):
            while True:
                n, extra = await self._write(_batch(step, policy.batch))
                retention.count(result, name, n, extra)
                if n < policy.batch:
                    break
                await asyncio.sleep(pause)  # let intake's jobs have commits of their own
        return result

    async def find_erasure(self, address: str) -> Erasure:
        return await self._read(lambda conn: retention.find_erasure(conn, address))

    async def erase(self, address: str, scanned: Erasure) -> Erasure:
        er = await self._write(retention.erase_job(address, scanned))
        er.compacted = await asyncio.to_thread(retention.compact, self.path)
        return er

    async def backup(self, dest: Path) -> int:
        """See `Spool.backup`: SQLite's online backup API on a connection of its own."""

        def copy() -> int:
            src = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            try:
                src.execute("PRAGMA busy_timeout = 30000")
                return migrations.online_backup(src, dest, mode_of=self.path)
            finally:
                src.close()

        try:
            return await asyncio.to_thread(copy)
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"backup of {self.path} to {dest} failed: {exc}") from exc

    async def integrity_check(self) -> str:
        return await self._read(lambda c: str(c.execute("PRAGMA integrity_check").fetchone()[0]))


def _batch(
    step: Callable[[sqlite3.Connection, int], tuple[int, int]], limit: int
) -> Callable[[sqlite3.Connection], tuple[int, int]]:
    return lambda conn: step(conn, limit)


# -- the map look-ups, on any connection: the daemon's and the dry run's read-only one ---------------


def _ack_limited(
    conn: sqlite3.Connection,
    limits: AckLimits,
    sender_key: str,
    domain: str,
    known: bool,
    since: float,
) -> str:
    """The hourly limit an acknowledgement would pass ("sender", "domain", "global"), or ""."""
    for step in ack_limit_steps(limits, sender_key, domain, known):
        if step.most <= 0:
            return step.verdict
        where, args = (f"{step.column} = ?", (step.value,)) if step.column else ("1 = 1", ())
        row = conn.execute(
            f"SELECT COUNT(*) FROM outbox WHERE {where} AND created_at >= ?", (*args, since)
        ).fetchone()
        if int(row[0]) >= step.most:
            return step.verdict
    return ""


def ticket_by_ref(
    conn: sqlite3.Connection, ref: str, prefer_backend: str | None = None
) -> TicketInfo | None:
    """See `Spool.ticket_by_ref`."""
    rows = conn.execute(
        "SELECT backend, system, ticket_id, requester FROM tickets WHERE ref = ?"
        " ORDER BY created_at DESC",
        (ref,),
    ).fetchall()
    return pick_ticket(rows, prefer_backend)


def thread_lookup(conn: sqlite3.Connection, message_ids: list[str]) -> ThreadHit | None:
    """See `Spool.thread_lookup`."""
    for mid in message_ids:
        r = conn.execute("SELECT backend, ref FROM threads WHERE message_id = ?", (mid,)).fetchone()
        if r:
            return ThreadHit(r[0], r[1])
    return None
