"""The SQLite spool's inspection (CLI, health, metrics): counts, listings, retry and drop, and
statistics."""

from __future__ import annotations

import sqlite3
from typing import Any

from gateway.spool import retention
from gateway.spool.base import MessageRow, QueueCounts, State
from gateway.spool.rows import MSG_COLUMNS, message_row
from gateway.spool.sqlite.plumbing import SqliteBase


class Inspection(SqliteBase):
    """See `Spool.counts`, `Spool.list_messages`, `Spool.retry`, `Spool.stats`."""

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
