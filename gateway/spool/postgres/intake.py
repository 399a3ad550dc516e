"""The PostgreSQL spool's intake side: `put` in group commit (or alone, in one statement),
and the source keys already stored."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Collection
from typing import Any

from gateway.errors import SpoolError
from gateway.models import Envelope
from gateway.spool.base import PutResult
from gateway.spool.postgres.plumbing import Conn, PostgresBase
from gateway.spool.postgres.schema import CHANNEL, MAX_BATCH

log = logging.getLogger("gateway.spool")

# One put; in a group (a transaction of several), or alone: then it is one statement in
# autocommit (its own transaction, one round trip, no BEGIN/COMMIT, no pipeline) that also
# signals the workers, which a group sends as a NOTIFY of its own. Alone, the put costs half
# the client CPU it costs as a group of one (0.75 instead of 1.55 ms here), and groups of
# one are what a node sees when several nodes share the load.
_PUT_TEMPLATE = """
WITH m AS (
    INSERT INTO messages (state, intake, mail_from, rcpt_tos, peer, received_at, size,
                          source_key, next_attempt_at, updated_at)
    VALUES ('queued', %s, %s, %s, %s, %s, %s, %s, 0, %s)
    ON CONFLICT (source_key) DO NOTHING
    RETURNING id
), b AS (
    INSERT INTO bodies (id, raw) SELECT id, %s FROM m
)
SELECT id, false AS duplicate FROM m{notify}
UNION ALL
SELECT id, true AS duplicate FROM messages WHERE %s::text IS NOT NULL AND source_key = %s
    AND NOT EXISTS (SELECT 1 FROM m)
"""
_PUT = _PUT_TEMPLATE.format(notify="")
_PUT_ONE = _PUT_TEMPLATE.format(notify=f" CROSS JOIN (SELECT pg_notify('{CHANNEL}', '')) AS w")


class Intake(PostgresBase):
    """See `Spool.put`, `Spool.known_source_keys`."""

    # -- intake: group commit -------------------------------------------------------------------------

    async def put(
        self, raw: bytes, envelope: Envelope, *, source_key: str | None = None
    ) -> PutResult:
        """See `Spool.put`. Puts arriving while a batch commits go together in the next one."""
        if self._closed:
            raise SpoolError("spool is closed")
        now = self.clock()
        params = (
            envelope.intake,
            envelope.mail_from,
            json.dumps(list(envelope.rcpt_tos)),
            envelope.peer,
            envelope.received_at or now,
            len(raw),
            source_key,
            now,
            bytes(raw),
            source_key,
            source_key,
        )
        fut: asyncio.Future[PutResult] = asyncio.get_running_loop().create_future()
        self._puts.append((params, fut))
        if self._put_task is None or self._put_task.done():
            self._put_task = asyncio.create_task(self._flush_puts(), name="spool-puts")
        result = await fut
        self.puts += 1
        return result

    async def _flush_puts(self) -> None:
        while self._puts and not self._closed:
            batch, self._puts = self._puts[:MAX_BATCH], self._puts[MAX_BATCH:]
            try:
                results = await self._put_batch([p for p, _ in batch])
            except SpoolError as exc:
                log.error(
                    "spool_commit_failed",
                    extra={"fields": {"error": str(exc), "batch": len(batch)}},
                )
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (params, fut), res in zip(batch, results, strict=True):
                if fut.done():
                    continue
                if res is None:  # another node stored the same source key at the same moment
                    fut.set_result(PutResult(id=await self._id_of(params[6]), duplicate=True))
                else:
                    fut.set_result(res)

    async def _put_batch(self, params: list[tuple[Any, ...]]) -> list[PutResult | None]:
        if len(params) == 1:  # one statement, committed on return (see _PUT_ONE)
            row = await self._one(_PUT_ONE, params[0])
            self.commits += 1
            return [PutResult(id=row["id"], duplicate=row["duplicate"]) if row else None]

        async def go(conn: Conn) -> list[PutResult | None]:
            out: list[PutResult | None] = []
            async with conn.cursor() as cur:
                await cur.executemany(_PUT, params, returning=True)
                while True:
                    row = await cur.fetchone()
                    out.append(PutResult(id=row["id"], duplicate=row["duplicate"]) if row else None)
                    if not cur.nextset():
                        break
            await conn.execute(f"NOTIFY {CHANNEL}")  # delivered at commit
            return out

        results = await self._run(go)
        self.commits += 1
        return results

    async def _id_of(self, source_key: str) -> int:
        row = await self._one("SELECT id FROM messages WHERE source_key = %s", (source_key,))
        if row is None:
            raise SpoolError("spool write failed: source key vanished")
        return int(row["id"])

    async def has_source_key(self, source_key: str) -> bool:
        return source_key in await self.known_source_keys([source_key])

    async def known_source_keys(self, source_keys: Collection[str]) -> set[str]:
        keys = list(dict.fromkeys(source_keys))
        if not keys:
            return set()
        rows = await self._all(
            "SELECT source_key FROM messages WHERE source_key = ANY(%s)", (keys,)
        )
        return {row["source_key"] for row in rows}
