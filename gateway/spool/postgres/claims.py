"""The PostgreSQL spool's claims: recovery, claims and leases (`FOR UPDATE SKIP LOCKED`: two
nodes never claim one mail and never wait for each other)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from gateway.spool.base import NodeInfo, Recovered
from gateway.spool.postgres.plumbing import Conn, PostgresBase
from gateway.spool.postgres.schema import CHANNEL, SLOT_CHANNEL
from gateway.spool.rows import node_info


class Claims(PostgresBase):
    """See `Spool.recover`, `Spool.claim_due`, `Spool.heartbeat`."""

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
