"""The PostgreSQL spool's data lifecycle: retention (the steps of `gateway.spool.retention`,
in PostgreSQL's SQL), erasure, backup, and `gateway spool copy`'s side of it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql
from psycopg_pool import PoolTimeout

from gateway.errors import SpoolError
from gateway.spool.base import Erasure, PurgeResult, RetentionPolicy, State
from gateway.spool.postgres.plumbing import Conn, PostgresBase
from gateway.spool.postgres.schema import CHANNEL, DATA_TABLES

log = logging.getLogger("gateway.spool")


class DataLifecycle(PostgresBase):
    """See `Spool.purge`, `Spool.erase`, `Spool.backup`; `is_empty` and `import_tables` for
    `gateway spool copy`."""

    if TYPE_CHECKING:  # `Messages`' (the erasure scan reads a whole body)

        async def read_body(self, msg_id: int) -> bytes | None: ...

    # -- data lifecycle ----------------------------------------------------------------------------------

    async def purge(self, policy: RetentionPolicy, *, pause: float = 0.0) -> PurgeResult:
        """See `Spool.purge` (the steps of `gateway.spool.retention`, in PostgreSQL's SQL)."""
        from gateway.spool import retention

        now = self.clock()
        day = retention.DAY
        maps_cut = now - policy.maps_days * day
        raw_days = {
            State.DONE: policy.done_raw_days,
            State.SUPPRESSED: policy.suppressed_raw_days,
            State.DUPLICATE: policy.duplicate_raw_days,
        }
        final = [s.value for s in retention.FINAL_RAW_STATES]
        steps: list[tuple[str, str, dict[str, Any]]] = [
            (
                f"raw:{s.value}",
                "WITH p AS (SELECT id, size FROM messages WHERE state = %(state)s"
                " AND updated_at < %(cut)s AND purged_at IS NULL LIMIT %(limit)s),"
                " d AS (DELETE FROM bodies WHERE id IN (SELECT id FROM p)),"
                " u AS (UPDATE messages SET purged_at = %(now)s WHERE id IN (SELECT id FROM p))"
                " SELECT COUNT(*) AS n, COALESCE(SUM(size), 0) AS x FROM p",
                {"state": s.value, "cut": now - raw_days[s] * day, "now": now},
            )
            for s in retention.FINAL_RAW_STATES
        ]
        for kind, states, cut in (
            ("messages", final, maps_cut),
            ("dead", [State.DEAD.value], now - policy.dead_days * day),
        ):
            steps.append(
                (
                    kind,
                    "WITH p AS (SELECT id FROM messages WHERE state = ANY(%(states)s)"
                    " AND updated_at < %(cut)s LIMIT %(limit)s),"
                    " o AS (DELETE FROM outbox WHERE message_id IN (SELECT id FROM p) RETURNING 1),"
                    " d AS (DELETE FROM messages WHERE id IN (SELECT id FROM p))"
                    " SELECT (SELECT COUNT(*) FROM p) AS n, (SELECT COUNT(*) FROM o) AS x",
                    {"states": states, "cut": cut},
                )
            )
        steps += [
            (
                "threads",
                "WITH p AS (SELECT t.message_id FROM threads t WHERE t.created_at < %(cut)s"
                " AND NOT EXISTS (SELECT 1 FROM threads u WHERE u.backend = t.backend"
                "  AND u.ref = t.ref AND u.created_at >= %(cut)s)"
                " AND NOT EXISTS (SELECT 1 FROM tickets k WHERE k.backend = t.backend"
                "  AND k.ref = t.ref AND k.created_at >= %(cut)s) LIMIT %(limit)s),"
                " d AS (DELETE FROM threads WHERE message_id IN (SELECT message_id FROM p))"
                " SELECT COUNT(*) AS n, 0 AS x FROM p",
                {"cut": maps_cut},
            ),
            (
                "tickets",
                "WITH p AS (SELECT k.backend, k.ref FROM tickets k WHERE k.created_at < %(cut)s"
                " AND NOT EXISTS (SELECT 1 FROM threads t WHERE t.backend = k.backend"
                "  AND t.ref = k.ref AND t.created_at >= %(cut)s) LIMIT %(limit)s),"
                " d AS (DELETE FROM tickets WHERE (backend, ref) IN (SELECT backend, ref FROM p))"
                " SELECT COUNT(*) AS n, 0 AS x FROM p",
                {"cut": maps_cut},
            ),
            (
                "outbox",
                "WITH p AS (SELECT id FROM outbox WHERE state IN ('sent', 'failed')"
                " AND created_at < %(cut)s LIMIT %(limit)s),"
                " d AS (DELETE FROM outbox WHERE id IN (SELECT id FROM p))"
                " SELECT COUNT(*) AS n, 0 AS x FROM p",
                {"cut": now - policy.outbox_days * day},
            ),
        ]
        result = PurgeResult()
        for kind, query, params in steps:
            while True:
                row = await self._one(query, {**params, "limit": policy.batch})
                n, extra = (int(row["n"]), int(row["x"])) if row else (0, 0)
                retention.count(result, kind, n, extra)
                if n < policy.batch:
                    break
                await asyncio.sleep(pause)
        return result

    async def _scan(self, address: str, after: int) -> tuple[list[tuple[int, str, int]], int]:
        from gateway.spool import retention

        found: list[tuple[int, str, int]] = []
        last = after
        while True:
            rows = await self._all(
                "SELECT m.id, m.state, m.size, m.mail_from, m.rcpt_tos,"
                " substring(b.raw from 1 for %s) AS head"
                " FROM messages m LEFT JOIN bodies b ON b.id = m.id"
                " WHERE m.id > %s ORDER BY m.id LIMIT 200",
                (retention.HEAD_BYTES, last),
            )
            if not rows:
                return found, last
            for r in rows:
                head = bytes(r["head"]) if r["head"] is not None else None
                if (
                    head is not None
                    and len(head) == retention.HEAD_BYTES
                    and b"\n\n" not in head.replace(b"\r\n", b"\n")
                ):
                    head = await self.read_body(r["id"]) or head
                if retention.matches(address, r["mail_from"], r["rcpt_tos"], head):
                    found.append((r["id"], r["state"], r["size"]))
            last = rows[-1]["id"]

    async def _map_rows(
        self, conn: Conn, address: str, msg_ids: list[int]
    ) -> tuple[list[tuple[str, str]], list[str], list[int]]:
        cur = await conn.execute(
            "SELECT backend, ref FROM tickets WHERE LOWER(TRIM(requester)) = %s", (address,)
        )
        tickets = [(r["backend"], r["ref"]) for r in await cur.fetchall()]
        threads: set[str] = set()
        for backend, ref in tickets:
            cur = await conn.execute(
                "SELECT message_id FROM threads WHERE backend = %s AND ref = %s", (backend, ref)
            )
            threads |= {r["message_id"] for r in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT id FROM outbox WHERE LOWER(TRIM(rcpt)) = %s OR message_id = ANY(%s)",
            (address, msg_ids),
        )
        outbox = {r["id"] for r in await cur.fetchall()}
        cur = await conn.execute(
            "SELECT t.message_id FROM threads t JOIN messages m ON m.message_id = t.message_id"
            " WHERE m.id = ANY(%s) AND m.message_id != ''",
            (msg_ids,),
        )
        threads |= {r["message_id"] for r in await cur.fetchall()}
        return tickets, sorted(threads), sorted(outbox)

    async def find_erasure(self, address: str) -> Erasure:
        address = address.strip().lower()
        found, last = await self._scan(address, 0)
        er = Erasure(address=address, scanned_to=last)
        for msg_id, state, size in found:
            if state == State.PROCESSING.value:
                er.busy.append(msg_id)
            else:
                er.message_ids.append(msg_id)
                er.raw_bytes += size
        tickets, threads, outbox = await self._run(
            lambda conn: self._map_rows(conn, address, er.message_ids)
        )
        er.tickets, er.threads, er.outbox = len(tickets), len(threads), len(outbox)
        return er

    async def erase(self, address: str, scanned: Erasure) -> Erasure:
        """See `Spool.erase`. Deleted rows stay in the table files until VACUUM FULL rewrites
        them (run here); copies in the server's WAL and in base backups are the DBA's to expire."""
        address = address.strip().lower()
        later, last = await self._scan(address, scanned.scanned_to)
        candidates = [*scanned.message_ids, *scanned.busy, *(r[0] for r in later)]

        async def go(conn: Conn) -> Erasure:
            er = Erasure(address=address, scanned_to=last)
            cur = await conn.execute(
                "SELECT id, state, size FROM messages WHERE id = ANY(%s) FOR UPDATE",
                (candidates,),
            )
            for r in await cur.fetchall():
                if r["state"] == State.PROCESSING.value:
                    er.busy.append(r["id"])
                else:
                    er.message_ids.append(r["id"])
                    er.raw_bytes += r["size"]
            tickets, threads, outbox = await self._map_rows(conn, address, er.message_ids)
            await conn.execute("DELETE FROM outbox WHERE id = ANY(%s)", (outbox,))
            await conn.execute("DELETE FROM threads WHERE message_id = ANY(%s)", (threads,))
            for backend, ref in tickets:
                await conn.execute(
                    "DELETE FROM tickets WHERE backend = %s AND ref = %s", (backend, ref)
                )
            await conn.execute("DELETE FROM messages WHERE id = ANY(%s)", (er.message_ids,))
            er.tickets, er.threads, er.outbox = len(tickets), len(threads), len(outbox)
            return er

        er = await self._run(go)
        try:
            async with self._pool.connection() as conn:  # autocommit: VACUUM needs it
                for table in DATA_TABLES:
                    await conn.execute(sql.SQL("VACUUM FULL {}").format(sql.Identifier(table)))
            er.compacted = True
        except (psycopg.Error, PoolTimeout) as exc:
            log.warning("erase_vacuum_failed", extra={"fields": {"error": str(exc)}})
            er.compacted = False
        return er

    async def backup(self, dest: Path) -> int:
        raise SpoolError("a PostgreSQL spool is backed up with the server's tools (pg_dump)")

    # -- `gateway spool copy` --------------------------------------------------------------------------

    async def is_empty(self) -> bool:
        async def go(conn: Conn) -> bool:
            for table in DATA_TABLES:
                cur = await conn.execute(
                    sql.SQL("SELECT EXISTS (SELECT 1 FROM {}) AS x").format(sql.Identifier(table))
                )
                row = await cur.fetchone()
                if row and row["x"]:
                    return False
            return True

        return await self._run(go)

    async def import_tables(
        self, tables: list[tuple[str, list[str], Iterable[tuple[Any, ...]]]]
    ) -> None:
        """COPY each (table, columns, rows) in, all in ONE transaction, then move the id
        sequences past the copied ids (`gateway spool copy`)."""

        async def go(conn: Conn) -> None:
            for table, columns, rows in tables:
                query = sql.SQL("COPY {} ({}) FROM STDIN").format(
                    sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
                )
                async with conn.cursor() as cur, cur.copy(query) as copy:
                    for row in rows:
                        await copy.write_row(row)
            for table in ("messages", "outbox"):
                await conn.execute(
                    sql.SQL(
                        "SELECT setval(pg_get_serial_sequence({t}, 'id'),"
                        " COALESCE((SELECT MAX(id) FROM {i}), 0) + 1, false)"
                    ).format(t=sql.Literal(table), i=sql.Identifier(table))
                )
            await conn.execute(f"NOTIFY {CHANNEL}")

        await self._run(go)
