"""The PostgreSQL spool's named leases, backend call slots and backend pauses: rows shared by
the cluster (a slot taken under a per-backend advisory lock)."""

from __future__ import annotations

from gateway.spool.postgres.plumbing import PostgresBase
from gateway.spool.postgres.schema import SLOT_CHANNEL


class Slots(PostgresBase):
    """See `Spool.try_lease`, `Spool.acquire_slot`, `Spool.pause_backend`."""

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
