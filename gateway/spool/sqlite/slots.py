"""The SQLite spool's named leases, backend call slots and backend pauses."""

from __future__ import annotations

import sqlite3

from gateway.spool.sqlite.plumbing import SqliteBase


class Slots(SqliteBase):
    """See `Spool.try_lease`, `Spool.acquire_slot`, `Spool.pause_backend`."""

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
