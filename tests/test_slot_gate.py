"""The worker's side of a backend's call slots (gateway.worker.SlotGate): one wake-up per freed
slot or slot handed over, none lost between a failed try and the wait, and cancelled waiters skipped."""

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
