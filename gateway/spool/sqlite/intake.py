"""The SQLite spool's intake side: `put` in the writer's group commit, and the source keys
already stored."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Collection
from concurrent.futures import Future
from typing import Any

from gateway.errors import SpoolError
from gateway.models import Envelope
from gateway.spool.base import BLOB_STREAM_MIN, PutResult, State
from gateway.spool.sqlite.plumbing import SqliteBase, _Job

BLOB_CHUNK = 1 << 18
SOURCE_KEYS_PER_QUERY = 500  # parameters of one IN (...) look-up (SQLite allows 32,766)


class Intake(SqliteBase):
    """See `Spool.put`, `Spool.known_source_keys`."""

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
