"""The SQLite spool's work on one claimed mail: its row and raw bytes, its identity, the steps
of its backend calls, deferring it, and its outcome (with the maps and the acknowledgement)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from typing import Any

from gateway.spool.base import BLOB_STREAM_MIN, AckLimits, MessageRow, Outcome, State
from gateway.spool.rows import MSG_COLUMNS, ack_limit_steps, copy_going_first, message_row
from gateway.spool.sqlite.plumbing import SqliteBase


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


class Messages(SqliteBase):
    """See `Spool.load`, `Spool.set_identity`, `Spool.begin_step`, `Spool.finish`."""

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
