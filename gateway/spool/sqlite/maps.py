"""The SQLite spool's ticket and thread maps and its outbox of acknowledgements."""

from __future__ import annotations

import sqlite3

from gateway.spool.base import AckRow, ThreadHit, TicketInfo
from gateway.spool.rows import ack_row, pick_ticket
from gateway.spool.sqlite.plumbing import SqliteBase


class Maps(SqliteBase):
    """See `Spool.ticket_by_ref`, `Spool.thread_lookup`, `Spool.due_acks`."""

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


# -- the map look-ups, on any connection: the daemon's and the dry run's read-only one ---------------


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
