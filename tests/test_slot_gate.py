"""The worker's side of a backend's call slots (gateway.worker.SlotGate): one wake-up per freed
slot, none lost between a failed try and the wait, and cancelled waiters skipped."""

from __future__ import annotations

import asyncio

from gateway.worker import SlotGate


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


async def test_local_places_are_the_limit() -> None:
    gate = SlotGate(2)
    await gate.local.acquire()
    await gate.local.acquire()
    third = asyncio.ensure_future(gate.local.acquire())
    await asyncio.sleep(0)
    assert not third.done()
    gate.local.release()
    await asyncio.wait_for(third, timeout=1)
