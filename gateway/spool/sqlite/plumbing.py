"""The SQLite spool's plumbing, which every concern of `SqliteSpool` builds on (`SqliteBase`):
its connections, the writer thread, the reader threads, closing, and the owner lock.

Durability with speed comes from group commit: every write goes through one writer thread that
owns the only write connection. It takes the first waiting job, then every job that queued up
meanwhile, runs them all in one transaction (a savepoint each, so one failing job fails alone) and
commits once: one fsync for the whole batch. Each caller's future resolves only after that commit,
so an SMTP `250` is never said for a mail that is not on disk. That is the only write path.
Reads run on a small pool of reader threads with a connection each and never wait for the writer
(WAL); nothing touches the database on the event loop's own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import SpoolError
from gateway.spool import migrations
from gateway.spool.base import PutResult
from gateway.spool.migrations import SCHEMA_VERSION

log = logging.getLogger("gateway.spool")

T = TypeVar("T")


class _Job:
    __slots__ = ("fn", "future")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any]) -> None:
        self.fn = fn
        self.future: Future[Any] = Future()


class SqliteBase:
    """The connections and the writer every concern of `SqliteSpool` runs its SQL on."""

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

    # -- signals between processes and the owner lock -------------------------------------------

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

    def on_work(self, callback: Callable[[], None]) -> None:
        """No signal between processes here: the intake wakes its worker itself (workerproc)."""

    def on_slot_freed(self, callback: Callable[[str], None]) -> None:
        """No signal between processes here: a worker process polls for a slot of another."""
