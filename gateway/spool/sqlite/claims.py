"""The SQLite spool's claims: recovery, claims and leases.

Crash recovery (`recover`, at start-up of a worker process): messages its owner name left
`processing` are put back to `queued`; the ones whose backend create call was begun but not
recorded done (`inflight`) are flagged `uncertain`, so the worker looks for the ticket before
creating it again. Several worker processes (`[gateway] worker_processes`) share the file: each
claims under its own owner name and lease (see `Spool`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Collection
from typing import Any

from gateway.spool.base import NodeInfo, Recovered
from gateway.spool.rows import node_info
from gateway.spool.sqlite.plumbing import SqliteBase


class Claims(SqliteBase):
    """See `Spool.recover`, `Spool.claim_due`, `Spool.heartbeat`."""

    # -- recovery, claims and leases --------------------------------------------------------------

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
