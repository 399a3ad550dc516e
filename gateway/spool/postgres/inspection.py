"""The PostgreSQL spool's inspection (CLI, health, metrics): counts, listings, retry and drop,
and statistics."""

from __future__ import annotations

from typing import Any

from gateway.spool.base import MessageRow, QueueCounts, State
from gateway.spool.postgres.plumbing import Conn, PostgresBase
from gateway.spool.postgres.schema import CHANNEL, SCHEMA_VERSION
from gateway.spool.rows import MSG_COLUMNS, message_row


class Inspection(PostgresBase):
    """See `Spool.counts`, `Spool.list_messages`, `Spool.retry`, `Spool.stats`."""

    # -- inspection ------------------------------------------------------------------------------------

    async def counts(self) -> QueueCounts:
        async def go(conn: Conn) -> QueueCounts:
            by_state = {s.value: 0 for s in State}
            cur = await conn.execute("SELECT state, COUNT(*) AS n FROM messages GROUP BY state")
            for r in await cur.fetchall():
                by_state[r["state"]] = int(r["n"])
            cur = await conn.execute(
                "SELECT state, COUNT(*) AS n FROM outbox WHERE state IN ('pending', 'failed')"
                " GROUP BY state"
            )
            outbox = {r["state"]: int(r["n"]) for r in await cur.fetchall()}
            return QueueCounts(
                by_state=by_state,
                outbox_pending=outbox.get("pending", 0),
                outbox_failed=outbox.get("failed", 0),
            )

        return await self._run(go)

    async def oldest_pending(self) -> float | None:
        row = await self._one(
            "SELECT MIN(received_at) AS t FROM messages"
            " WHERE state IN ('queued', 'deferred', 'processing')"
        )
        return row["t"] if row else None

    async def list_messages(self, state: str | None = None, limit: int = 1000) -> list[MessageRow]:
        if state:
            rows = await self._all(
                f"SELECT {MSG_COLUMNS} FROM messages WHERE state = %s ORDER BY id LIMIT %s",
                (state, limit),
            )
        else:
            rows = await self._all(
                f"SELECT {MSG_COLUMNS} FROM messages ORDER BY id LIMIT %s", (limit,)
            )
        return [message_row(r) for r in rows]

    async def retry(self, msg_id: int | None = None, *, all_dead: bool = False) -> int:
        now = self.clock()

        async def go(conn: Conn) -> int:
            if all_dead:
                cur = await conn.execute(
                    "UPDATE messages SET state = 'queued', next_attempt_at = %s, attempts = 0,"
                    " first_attempt_at = NULL, updated_at = %s WHERE state = 'dead'",
                    (now, now),
                )
            else:
                cur = await conn.execute(
                    "UPDATE messages SET state = 'queued', next_attempt_at = %s, attempts = 0,"
                    " first_attempt_at = NULL, updated_at = %s WHERE id = %s"
                    " AND state IN ('dead', 'deferred', 'queued', 'suppressed')",
                    (now, now, msg_id),
                )
            if cur.rowcount:
                await conn.execute(f"NOTIFY {CHANNEL}")
            return cur.rowcount

        return await self._run(go)

    async def drop(self, msg_id: int) -> int:
        async def go(conn: Conn) -> int:
            await conn.execute(
                "DELETE FROM outbox WHERE message_id = %s AND state = 'pending'", (msg_id,)
            )
            cur = await conn.execute(
                "DELETE FROM messages WHERE id = %s AND state != 'processing'", (msg_id,)
            )
            return cur.rowcount

        return await self._run(go)

    async def stats(self) -> dict[str, Any]:
        now = self.clock()

        def age(t: float | None) -> float | None:
            return None if t is None else round(max(0.0, now - t), 1)

        async def go(conn: Conn) -> dict[str, Any]:
            states: dict[str, dict[str, Any]] = {
                s.value: {
                    "count": 0,
                    "bytes": 0,
                    "raw_bytes": 0,
                    "purged": 0,
                    "oldest_age_s": None,
                    "oldest_change_age_s": None,
                }
                for s in State
            }
            cur = await conn.execute(
                "SELECT state, COUNT(*) AS n, COALESCE(SUM(size), 0) AS b,"
                " COALESCE(SUM(CASE WHEN purged_at IS NULL THEN size ELSE 0 END), 0) AS rb,"
                " SUM(CASE WHEN purged_at IS NULL THEN 0 ELSE 1 END) AS p,"
                " MIN(received_at) AS r, MIN(updated_at) AS u FROM messages GROUP BY state"
            )
            for r in await cur.fetchall():
                states[r["state"]] = {
                    "count": int(r["n"]),
                    "bytes": int(r["b"]),
                    "raw_bytes": int(r["rb"]),
                    "purged": int(r["p"] or 0),
                    "oldest_age_s": age(r["r"]),
                    "oldest_change_age_s": age(r["u"]),
                }
            outbox: dict[str, dict[str, Any]] = {
                s: {"count": 0, "bytes": 0, "oldest_age_s": None}
                for s in ("pending", "sent", "failed")
            }
            cur = await conn.execute(
                "SELECT state, COUNT(*) AS n, COALESCE(SUM(LENGTH(data)), 0) AS b,"
                " MIN(created_at) AS c FROM outbox GROUP BY state"
            )
            for r in await cur.fetchall():
                outbox[r["state"]] = {
                    "count": int(r["n"]),
                    "bytes": int(r["b"]),
                    "oldest_age_s": age(r["c"]),
                }
            cur = await conn.execute("SELECT COUNT(*) AS n, MIN(created_at) AS c FROM tickets")
            tickets = await cur.fetchone()
            cur = await conn.execute("SELECT COUNT(*) AS n, MIN(created_at) AS c FROM threads")
            threads = await cur.fetchone()
            cur = await conn.execute("SELECT pg_database_size(current_database()) AS n")
            size = await cur.fetchone()
            assert tickets is not None and threads is not None and size is not None
            return {
                "schema_version": SCHEMA_VERSION,
                "engine": self.engine,
                "states": states,
                "raw_bytes": sum(v["raw_bytes"] for v in states.values()),
                "maps": {
                    "tickets": int(tickets["n"]),
                    "threads": int(threads["n"]),
                    "oldest_ticket_age_s": age(tickets["c"]),
                    "oldest_thread_age_s": age(threads["c"]),
                },
                "outbox": outbox,
                "files": {"database_bytes": int(size["n"])},
            }

        return await self._run(go)
