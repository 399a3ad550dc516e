"""The SQLite spool's data lifecycle: retention, erasure, backup and the integrity check (the
steps themselves are `gateway.spool.retention`'s and `gateway.spool.migrations`')."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from pathlib import Path

from gateway.errors import SpoolError
from gateway.spool import migrations, retention
from gateway.spool.base import Erasure, PurgeResult, RetentionPolicy
from gateway.spool.sqlite.plumbing import SqliteBase


class DataLifecycle(SqliteBase):
    """See `Spool.purge`, `Spool.erase`, `Spool.backup`."""

    # -- data lifecycle ----------------------------------------------------------------------------

    async def purge(self, policy: RetentionPolicy, *, pause: float = 0.0) -> PurgeResult:
        """See `Spool.purge`: each batch is one job of the writer (intake shares its commit)."""
        result = PurgeResult()
        for name, step in retention.sqlite_steps(policy, self.clock()):
            while True:
                n, extra = await self._write(_batch(step, policy.batch))
                retention.count(result, name, n, extra)
                if n < policy.batch:
                    break
                await asyncio.sleep(pause)  # let intake's jobs have commits of their own
        return result

    async def find_erasure(self, address: str) -> Erasure:
        return await self._read(lambda conn: retention.find_erasure(conn, address))

    async def erase(self, address: str, scanned: Erasure) -> Erasure:
        er = await self._write(retention.erase_job(address, scanned))
        er.compacted = await asyncio.to_thread(retention.compact, self.path)
        return er

    async def backup(self, dest: Path) -> int:
        """See `Spool.backup`: SQLite's online backup API on a connection of its own."""

        def copy() -> int:
            src = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            try:
                src.execute("PRAGMA busy_timeout = 30000")
                return migrations.online_backup(src, dest, mode_of=self.path)
            finally:
                src.close()

        try:
            return await asyncio.to_thread(copy)
        except (OSError, sqlite3.Error) as exc:
            raise SpoolError(f"backup of {self.path} to {dest} failed: {exc}") from exc

    async def integrity_check(self) -> str:
        return await self._read(lambda c: str(c.execute("PRAGMA integrity_check").fetchone()[0]))


def _batch(
    step: Callable[[sqlite3.Connection, int], tuple[int, int]], limit: int
) -> Callable[[sqlite3.Connection], tuple[int, int]]:
    return lambda conn: step(conn, limit)
