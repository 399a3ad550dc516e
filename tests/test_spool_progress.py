"""The worker's `Progress` (gateway.worker.SpoolProgress) on a real spool: a step done is durable
before the next call begins and before the mail's calls are declared over; a `begin` right after a
`done` records both in one write; a result the spool could not take is written again while the
mail's claim holds."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from gateway.errors import SpoolError
from gateway.models import Envelope
from gateway.spool import Spool, SpoolSettings, open_spool
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


async def _claimed(tmp_path: Path, *, lease_left: float = 30) -> tuple[Spool, SpoolProgress]:
    """A spool with one mail claimed and its first call (newTicket) begun."""
    spool = await open_spool(SpoolSettings(path=tmp_path / "s.sqlite"))
    m = (await spool.put(MAIL, ENV)).id
    assert await spool.claim_due(1) == [m]
    progress = SpoolProgress(spool, m, {}, safe_until=lambda: time.time() + lease_left)
    await progress.begin("newTicket")
    return spool, progress


def _failing(spool: object, name: str, failures: int, calls: list[str]) -> None:
    """Make the spool's `name` write fail `failures` times (as a PostgreSQL restart does)."""
    real = getattr(spool, name)
    left = [failures]

    async def flaky(*a: object, **kw: object) -> None:
        calls.append(name)
        if left[0] > 0:
            left[0] -= 1
            raise SpoolError("spool unreachable (test): connection refused")
        await real(*a, **kw)

    setattr(spool, name, flaky)


async def test_a_finished_call_is_recorded_once_the_spool_is_back(tmp_path: Path) -> None:
    """The spool is away when a call's result (the ticket id) is written: the write is tried
    again while the claim holds, so the mail is not put back uncertain (a second ticket)."""
    spool, progress = await _claimed(tmp_path)
    m = progress.msg_id
    try:
        calls: list[str] = []
        _failing(spool, "done_step", 2, calls)
        await progress.done("newTicket", ticket_id="7")
        await asyncio.sleep(0.05)  # the write is under way and fails
        await progress.begin("addMessage")  # waits until the result is durable
        assert calls == ["done_step"] * 3
        row = await spool.load(m)
        assert row is not None and row.progress == {"newTicket": {"ticket_id": "7"}}
        assert (await spool.release([m])).uncertain == 1  # addMessage is the call in flight
    finally:
        await spool.close()


async def test_a_combined_write_that_fails_still_records_the_result(tmp_path: Path) -> None:
    spool, progress = await _claimed(tmp_path)
    m = progress.msg_id
    try:
        calls: list[str] = []
        _failing(spool, "begin_step", 1, calls)
        _failing(spool, "done_step", 1, calls)
        await progress.done("newTicket", ticket_id="7")
        await progress.begin("addMessage")  # done + begin in one write: it fails
        assert calls == ["begin_step", "done_step", "done_step", "begin_step"]
        row = await spool.load(m)
        assert row is not None and row.progress == {"newTicket": {"ticket_id": "7"}}
        assert (await spool.release([m])).uncertain == 1  # addMessage is the call in flight
    finally:
        await spool.close()


async def test_the_write_gives_up_when_the_claim_may_have_passed_on(tmp_path: Path) -> None:
    """Past the lease another node may hold the mail: the error goes on (the mail is put back
    flagged uncertain) instead of writing into a claim that is no longer this process's."""
    spool, progress = await _claimed(tmp_path, lease_left=0.3)
    m = progress.msg_id
    try:
        calls: list[str] = []
        _failing(spool, "done_step", 100, calls)
        await progress.done("newTicket", ticket_id="7")
        with pytest.raises(SpoolError):
            await progress.flush()
        assert 1 < len(calls) < 5  # tried again within the lease, then gave up
        assert (await spool.release([m])).uncertain == 1
    finally:
        await spool.close()
