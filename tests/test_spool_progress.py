"""The worker's `Progress` (gateway.worker.SpoolProgress) on a real spool: a step done is durable
before the next call begins and before the mail's calls are declared over; a `begin` right after a
`done` records both in one write."""

from __future__ import annotations

import asyncio
from pathlib import Path

from gateway.models import Envelope
from gateway.spool import SpoolSettings, open_spool
from gateway.worker import SpoolProgress

ENV = Envelope(mail_from="a@example.org", rcpt_tos=("support@example.com",), peer="127.0.0.1")
MAIL = b"From: a@example.org\r\nSubject: s\r\nMessage-ID: <p@example.org>\r\n\r\nbody\r\n"


async def test_done_then_begin_records_both_in_one_write(tmp_path: Path) -> None:
    spool = await open_spool(SpoolSettings(path=tmp_path / "s.sqlite"))
    try:
        m = (await spool.put(MAIL, ENV)).id
        assert await spool.claim_due(1) == [m]
        progress = SpoolProgress(spool, m, {})
        writes: list[str] = []
        begin_step, done_step = spool.begin_step, spool.done_step

        async def counted_begin(*a: object, **kw: object) -> None:
            writes.append("begin")
            await begin_step(*a, **kw)  # type: ignore[arg-type]

        async def counted_done(*a: object, **kw: object) -> None:
            writes.append("done")
            await done_step(*a, **kw)  # type: ignore[arg-type]

        spool.begin_step, spool.done_step = counted_begin, counted_done  # type: ignore[method-assign]
        await progress.begin("newTicket")
        await progress.done("newTicket", ticket_id="7")
        await progress.begin("addMessage")  # nothing happened in between: one write
        assert writes == ["begin", "begin"]
        row = await spool.load(m)
        assert row is not None and row.progress == {"newTicket": {"ticket_id": "7"}}
        await progress.done("addMessage", message_id="9")
        await asyncio.sleep(0.05)  # the write is under way: begin waits for it, then its own
        await progress.begin("extra")
        assert writes == ["begin", "begin", "done", "begin"]
        await progress.done("extra")
        await progress.flush()  # the calls are over: everything done is durable
        row = await spool.load(m)
        assert row is not None and set(row.progress) == {"newTicket", "addMessage", "extra"}
        assert (await spool.release([m])).uncertain == 0  # no step left in flight
    finally:
        await spool.close()
