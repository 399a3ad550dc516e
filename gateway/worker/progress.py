"""`SpoolProgress`: the `Progress` a backend reports its steps to for one mail, each step durable
in the spool before the next call (a finished call's result is written again while the spool is
away, for as long as the mail's claim holds)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from gateway.errors import SpoolError
from gateway.spool.base import Spool

log = logging.getLogger("gateway.worker")

PROGRESS_RETRY_FIRST = 0.2  # s before a failed progress write is tried again (doubling)
PROGRESS_RETRY_MAX = 2.0


class SpoolProgress:
    """`Progress` backed by the spool: every step is durable before the next call. See `Progress`.

    `done` starts its write at once without waiting for it (the backend goes on building its
    next request meanwhile); `begin` waits for that write before it records the next call, and
    `flush` (when the mail's calls are over) before anything else happens to the mail. A `begin`
    that comes before the write has even started (no await in between: nothing else happened)
    records both in one statement: one spool round trip between two calls instead of two.
    A `done` the spool cannot take (PostgreSQL restarting) is tried again for as long as the
    mail's claim holds (`safe_until`): the result exists only in this process until then.
    """

    def __init__(
        self,
        spool: Spool,
        msg_id: int,
        data: dict[str, Any],
        *,
        safe_until: Callable[[], float] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.spool = spool
        self.msg_id = msg_id
        self.data: dict[str, Any] = dict(data)
        self.safe_until = safe_until  # until when this process's claim on the mail holds
        self.clock = clock
        self._start: asyncio.Handle | None = None  # the done write, not started yet
        self._write: asyncio.Task[None] | None = None  # the done write, under way

    async def begin(self, step: str) -> None:
        if self._start is not None:  # not started: it goes with this one
            self._start.cancel()
            self._start = None
            try:
                await self.spool.begin_step(self.msg_id, step, progress=self.data)
                return
            except SpoolError:  # the finished call first, as `done` would have written it
                await self._durably()
        await self.flush()
        await self.spool.begin_step(self.msg_id, step)

    async def done(self, step: str, **values: Any) -> None:
        self.data[step] = values
        if self._start is None:
            self._start = asyncio.get_running_loop().call_soon(self._start_write)

    def _start_write(self) -> None:
        self._start = None
        previous = self._write
        self._write = asyncio.get_running_loop().create_task(self._done_step(previous))

    async def _done_step(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:  # in order
            with contextlib.suppress(Exception):  # its failure is raised by whoever waits
                await previous
        await self._durably()

    async def _durably(self) -> None:
        """Record a finished call, trying again while the spool is away (PostgreSQL restarting,
        SQLite busy) for as long as this process's claim on the mail holds: what the call
        returned (a ticket id) is known only here, and a mail put back without it is flagged
        uncertain and may become a second ticket. Past the claim's lease another node may have
        taken the mail over, so the write gives up there and the error goes on."""
        delay = PROGRESS_RETRY_FIRST
        logged = False
        while True:
            try:
                await self.spool.done_step(self.msg_id, self.data)
            except SpoolError as exc:
                if self.safe_until is None or self.clock() + delay > self.safe_until():
                    raise
                if not logged:
                    log.warning(
                        "progress_write_retrying",
                        extra={"fields": {"id": self.msg_id, "error": str(exc)}},
                    )
                    logged = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, PROGRESS_RETRY_MAX)
            else:
                if logged:
                    log.info("progress_write_recovered", extra={"fields": {"id": self.msg_id}})
                return

    async def flush(self) -> None:
        """Wait until every `done` so far is durable (raises the spool's error)."""
        if self._start is not None:
            self._start.cancel()
            self._start_write()
        write, self._write = self._write, None
        if write is not None:
            await write
