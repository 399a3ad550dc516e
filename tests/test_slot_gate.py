"""The worker's side of a backend's call slots (gateway.worker.SlotGate): one wake-up per freed
slot or slot handed over, none lost between a failed try and the wait, and cancelled waiters skipped."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from gateway.rules import load_rules
from gateway.spool import SpoolSettings, open_spool
from gateway.spool.base import Outcome, State
from gateway.worker import SlotGate, Worker, WorkerSettings

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("superoffice-soap", "superoffice-rest", "interserver", "whmcs")


async def test_a_freed_slot_wakes_only_the_first_waiter() -> None:
    gate = SlotGate(2)
    first, second = gate.waiter(), gate.waiter()
    gate.freed()
    assert first.done() and not second.done()
    gate.freed()
    assert second.done()
    gate.freed()  # nobody waits: nothing happens, nothing is kept for later
    assert not gate.waiter().done()


async def test_a_release_during_the_try_is_not_lost() -> None:
    """The waiter is registered before the spool is asked: a release that lands while the
    answer ("all taken") is on its way still wakes it."""
    gate = SlotGate(1)
    woken = gate.waiter()
    gate.freed()  # the release, before the task waits
    await asyncio.wait_for(woken, timeout=1)


async def test_cancelled_waiters_are_skipped() -> None:
    gate = SlotGate(1)
    gone, alive = gate.waiter(), gate.waiter()
    gone.cancel()  # its task timed out and polls instead
    gate.freed()
    assert alive.done() and alive.result() is None


async def test_a_held_slot_is_handed_to_the_first_waiter() -> None:
    """A mail whose calls are over lends its slot to the next waiting mail of the process at
    once (no spool round trip); with nobody waiting it is not handed anywhere."""
    gate = SlotGate(2)
    gone, first, second = gate.waiter(), gate.waiter(), gate.waiter()
    gone.cancel()
    assert gate.hand_over(7)
    assert first.result() == 7 and not second.done()
    gate.freed()
    assert second.result() is None  # a release in the spool: try it again
    assert not gate.hand_over(7)  # nobody waits: the caller gives the slot back to the spool


def count_asks(spool: Any) -> list[int]:
    """Count the spool's acquire_slot calls (asks[0]) on a real spool."""
    asks = [0]
    acquire = spool.acquire_slot

    async def counted(*a: Any, **kw: Any) -> bool:
        asks[0] += 1
        return bool(await acquire(*a, **kw))

    spool.acquire_slot = counted
    return asks


async def test_mails_share_the_slots_a_process_holds_and_give_them_all_back(
    tmp_path: Path,
) -> None:
    """Worker._take_slot / _give_slot on a real spool: 6 mails through 2 slots; the process never
    holds more than 2 rows, a mail handed a slot starts without asking the spool, and when no mail
    waits every slot goes back (none left held, none left in the spool)."""
    spool = await open_spool(SpoolSettings(path=tmp_path / "s.sqlite"))
    other = await open_spool(SpoolSettings(path=tmp_path / "s.sqlite", node="other"))
    rules = load_rules(ROOT / "rules", {b: b for b in BACKENDS})
    worker = Worker(spool, {}, rules, {}, WorkerSettings(), tokens={})
    asks = count_asks(spool)
    in_calls = 0
    most = 0

    async def mail(n: int) -> None:
        nonlocal in_calls, most
        label = await worker._take_slot("whmcs", 2, n)
        assert label is not None
        in_calls += 1
        most = max(most, in_calls)
        await asyncio.sleep(0.05)  # the calls
        in_calls -= 1
        await worker._give_slot("whmcs", label)

    try:
        await asyncio.gather(*(mail(n) for n in range(1, 7)))
        assert most == 2
        assert asks[0] <= 3  # two rows taken (and perhaps one try that found both held)
        assert worker._held_slots() == set()
        assert await other.acquire_slot("whmcs", 2, 100)  # all given back to the spool
        assert await other.acquire_slot("whmcs", 2, 101)
    finally:
        await spool.close()
        await other.close()


async def test_waiting_mails_share_one_poll(tmp_path: Path, monkeypatch: Any) -> None:
    """All slots are held by another process (no signal between SQLite processes): the mails
    waiting for one do not each poll the spool; the process asks once per backoff step, and a
    slot released meanwhile is still found by that poll."""
    monkeypatch.setattr("gateway.worker.slots.SLOT_WAIT", 1.5)
    spool = await open_spool(SpoolSettings(path=tmp_path / "s.sqlite"))
    other = await open_spool(SpoolSettings(path=tmp_path / "s.sqlite", node="other"))
    rules = load_rules(ROOT / "rules", {b: b for b in BACKENDS})
    worker = Worker(spool, {}, rules, {}, WorkerSettings(), tokens={})
    asks = count_asks(spool)
    try:
        assert await other.acquire_slot("whmcs", 2, 100)
        assert await other.acquire_slot("whmcs", 2, 101)
        loop = asyncio.get_running_loop()
        got: dict[int, float] = {}

        async def mail(n: int) -> int | None:
            label = await worker._take_slot("whmcs", 2, n)
            if label is not None:
                got[n] = loop.time()
            return label

        waiting = [asyncio.create_task(mail(n)) for n in range(1, 9)]
        await asyncio.sleep(0.6)
        freed_at = loop.time()
        await other.release_slot("whmcs", 100)  # no signal: only the poll can find it
        labels = await asyncio.gather(*waiting)
        assert len([x for x in labels if x is not None]) == 1
        assert min(got.values()) - freed_at < 0.5  # found by the next poll (<= 0.25 s apart)
        # 8 mails waited 1.5 s: one ask per backoff step of the process (about 15: the backoff
        # starts again after the slot was found), where each mail polling on its own timer
        # made about 70 in all
        assert asks[0] <= 24, asks
        assert worker._held_slots() == {labels[[x is not None for x in labels].index(True)]}
    finally:
        await spool.close()
        await other.close()


async def test_a_full_worker_does_not_ask_the_spool_at_each_signal(tmp_path: Path) -> None:
    """Every seat of the worker is taken: signals of new work (another node's puts, the
    intake's wake-ups) do not make it ask the spool again and again until a seat frees; the
    mail waiting is claimed once one does."""
    from gateway.models import Envelope

    spool = await open_spool(SpoolSettings(path=tmp_path / "s.sqlite"))
    rules = load_rules(ROOT / "rules", {b: b for b in BACKENDS})
    worker = Worker(spool, {}, rules, {}, WorkerSettings(concurrency=1), tokens={})
    release = asyncio.Event()
    seen: list[int] = []

    async def process(msg_id: int) -> None:  # the mail's processing, held until released
        seen.append(msg_id)
        await release.wait()
        await spool.finish(msg_id, Outcome(state=State.DEAD, reason="test"))

    worker.process = process  # type: ignore[method-assign]
    asks = 0
    for name in ("claim_due", "next_due_at"):
        real = getattr(spool, name)

        def counted(*a: Any, _real: Any = real, **kw: Any) -> Any:
            nonlocal asks
            asks += 1
            return _real(*a, **kw)

        setattr(spool, name, counted)
    env = Envelope(intake="smtp", mail_from="a@example.org", rcpt_tos=("b@example.com",))
    first = await spool.put(b"Subject: 1\r\n\r\nx", env)
    run = asyncio.create_task(worker.run())
    try:
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        assert seen == [first.id]
        second = await spool.put(b"Subject: 2\r\n\r\nx", env)
        asks = 0
        for _ in range(50):  # 50 signals over 0.5 s while the only seat is taken
            worker.notify()
            await asyncio.sleep(0.01)
        assert asks <= 2, asks
        release.set()
        for _ in range(200):
            if len(seen) == 2:
                break
            await asyncio.sleep(0.01)
        assert seen == [first.id, second.id]
    finally:
        release.set()
        await worker.drain(2)
        run.cancel()
        with contextlib.suppress(BaseException):
            await run
        await spool.close()
