"""`gateway spool copy --to postgresql://...`: move a stopped SQLite spool into PostgreSQL.

Everything the spool holds goes over as it is: the queue in every state (with attempts, progress
of multi-step backend calls and uncertain flags), the raw bytes, the ticket and Message-ID maps
(so follow-ups thread to tickets made before the move) and the outbox (pending acknowledgements
are sent by the new nodes; sent ones keep counting for the hourly limits). Message and outbox ids
are kept, so a `gateway queue show ID` still finds the same mail.

The copy runs in ONE PostgreSQL transaction: it lands whole or not at all. It refuses a target
that holds any mail, map entry or acknowledgement (it never merges two spools), and a SQLite spool
that a running gateway still works on (its owner lock is held).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gateway.errors import SpoolError
from gateway.spool.base import SpoolSettings
from gateway.spool.postgres import DATA_TABLES, PostgresSpool
from gateway.spool.sqlite import SqliteSpool


class CopyRefused(SpoolError):
    """The copy was not made (target not empty, source in use); nothing was changed."""


@dataclass
class CopyResult:
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows copied


def _in_use(path: Path) -> bool:
    """Whether a gateway process holds one of the spool's owner locks (it is running)."""
    for lock in path.parent.glob(f"{path.name}.worker*.lock"):
        fd = os.open(lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
    return False


def copy_sqlite_to_postgres(
    path: Path, url: str, *, password: str | None = None, node: str = "copy"
) -> CopyResult:
    """Copy the SQLite spool at `path` into the empty PostgreSQL spool at `url` (a command of
    its own: it runs its own event loop). Raises `CopyRefused`, or `SpoolError`."""
    if not path.exists():
        raise CopyRefused(f"no spool at {path}")
    if _in_use(path):
        raise CopyRefused(f"{path} is in use by a running gateway: stop it first")
    return asyncio.run(_copy(path, url, password, node))


async def _copy(path: Path, url: str, password: str | None, node: str) -> CopyResult:
    # opened once the usual way: an older spool is migrated first (after its backup copy)
    await SqliteSpool(path).close()
    target = await PostgresSpool.open(SpoolSettings(url=url, password=password, node=node))
    try:
        if not await target.is_empty():
            raise CopyRefused(
                f"{target.where()} already holds a spool (mail, maps or outbox): refusing to"
                " merge; copy into an empty database"
            )
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            result = CopyResult()

            def table(name: str) -> tuple[str, list[str], Iterator[tuple[Any, ...]]]:
                cols = [r[1] for r in src.execute(f"PRAGMA table_info({name})")]
                rows = src.execute(f"SELECT {', '.join(cols)} FROM {name} ORDER BY rowid")
                result.rows[name] = src.execute(f"SELECT COUNT(*) FROM {name}").fetchone()[0]
                return name, cols, (tuple(_value(v) for v in r) for r in rows)

            await target.import_tables([table(name) for name in DATA_TABLES])
        finally:
            src.close()
        return result
    finally:
        await target.close()


def _value(v: Any) -> Any:
    return bytes(v) if isinstance(v, memoryview) else v
