"""The spool: the single source of truth for every message, ticket map and pending acknowledgement.

`open_spool` is the one place that picks an engine (SQLite for `path`, PostgreSQL for `url`); the
rest of the gateway sees only the `Spool` protocol (`gateway.spool.base`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from gateway.spool.base import (
    AckDraft,
    AckRow,
    MessageRow,
    Outcome,
    PutResult,
    QueueCounts,
    Recovered,
    Spool,
    SpoolSettings,
    State,
    ThreadHit,
    TicketInfo,
)

__all__ = [
    "AckDraft",
    "AckRow",
    "MessageRow",
    "Outcome",
    "PutResult",
    "QueueCounts",
    "Recovered",
    "Spool",
    "SpoolSettings",
    "State",
    "ThreadHit",
    "TicketInfo",
    "open_spool",
]


async def open_spool(settings: SpoolSettings, *, clock: Callable[[], float] = time.time) -> Spool:
    """Open (create or migrate where allowed) the spool `settings` describe.

    Raises `SpoolError` when it cannot be opened. The engine modules are imported here only, so
    a SQLite installation never needs the PostgreSQL driver.
    """
    if settings.url:
        from gateway.spool.postgres import PostgresSpool

        return await PostgresSpool.open(settings, clock=clock)
    from gateway.spool.sqlite import SqliteSpool

    if settings.path is None:
        raise ValueError("SpoolSettings needs a path or a url")
    return SqliteSpool(
        settings.path,
        synchronous="FULL" if settings.durable else "NORMAL",
        node=settings.node,
        worker=settings.worker,
        lease=settings.lease,
        read_only=settings.read_only,
        clock=clock,
    )
