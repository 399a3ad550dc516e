"""A backend's call slots across the cluster (its `concurrency`): `SlotGate`, this process's side
of one backend's slots; `CallSlots`, the worker's methods that take a slot for a mail, lend it on
to the next mail of this process or give it back to the spool; `_SlotHold`, a slot lent to one
mail."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

from gateway.errors import SpoolError
from gateway.retry import SLOT_BACKOFF, SLOT_POLL_SIGNALLED, Backoff
from gateway.spool.base import Spool

SLOT_WAIT = 5.0  # s a mail waits for a backend call slot before it steps back into the queue


class SlotGate:
    """This process's side of one backend's call slots. A slot is a row in the spool (counted
    across the cluster, at most `limit` rows per backend); this process holds some of them
    (`held`, by the label each was taken under) and lends each to one of its mails at a time.
    A mail whose calls are over hands its slot straight to the next of this process's mails
    that waits for one (`hand_over`: no spool round trip between one call and the next); only
    when none waits does the slot go back to the spool, where other processes and nodes can
    take it (and are signalled). One mail at a time asks the spool for one slot more
    (`trying`). When the spool says all slots are held elsewhere, the waiting mails sleep until
    a hand-over, a release signalled by the spool (`freed()`), or the process's one poll
    (`missed()`: one ask per process with `backoff`, whatever the number of waiting mails; the
    fallback for engines without signals and for a dead owner's slot that expires, so slower
    where the spool signals every release). So the mails waiting for a slot never poll the
    spool each on its own timer: a node that holds no slot while others hand theirs on costs
    the spool one ask per poll, not one per waiting mail and backoff step."""

    def __init__(self, limit: int, backoff: Backoff = SLOT_BACKOFF) -> None:
        self.limit = limit
        self.backoff = backoff  # of the poll after a miss
        self.held: set[int] = set()  # labels of the slot rows this process holds
        self.trying = False  # one of its mails is asking the spool for a slot
        self.misses = 0  # asks in a row that found every slot held elsewhere
        self._waiting: deque[asyncio.Future[int | None]] = deque()
        self._poll: asyncio.TimerHandle | None = None  # the next ask after a miss

    def waiter(self) -> asyncio.Future[int | None]:
        """Register before trying the spool, so that a release or hand-over during the try is
        not missed. The result: a slot handed over (its label), or None (try the spool)."""
        while self._waiting and self._waiting[0].done():
            self._waiting.popleft()
        fut: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self._waiting.append(fut)
        return fut

    def may_ask(self) -> bool:
        """May a mail that comes to wait ask the spool at once? Not while another asks, nor
        while the poll after a miss is pending (all slots were held elsewhere a moment ago)."""
        return not self.trying and self._poll is None

    def hand_over(self, label: int) -> bool:
        """Lend the held slot `label` to the first waiter; False when nobody waits."""
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(label)
                return True
        return False

    def freed(self) -> None:
        """A slot came free in the spool: the first waiter tries again (one per release)."""
        while self._waiting:
            fut = self._waiting.popleft()
            if not fut.done():
                fut.set_result(None)
                return

    def got(self) -> None:
        self.misses = 0

    def missed(self) -> None:
        """The spool had no slot: the first waiter asks again after the backoff (unless a
        release or a hand-over comes first)."""
        self.misses += 1
        self.poll_later()

    def poll_later(self) -> None:
        if self._poll is None:
            delay = self.backoff.delay(max(1, self.misses))
            self._poll = asyncio.get_running_loop().call_later(delay, self._poll_due)

    def _poll_due(self) -> None:
        self._poll = None
        self.freed()


class _SlotHold:
    """A call slot lent to one mail: `release` passes it on once (see `Worker._give_slot`)."""

    def __init__(self, worker: CallSlots, backend: str, label: int) -> None:
        self.worker, self.backend, self.label = worker, backend, label
        self._held = True

    async def release(self) -> None:
        if not self._held:
            return
        self._held = False
        await self.worker._give_slot(self.backend, self.label)


class CallSlots:
    """The `Worker`'s call-slot methods (it inherits them): one `SlotGate` per backend in
    `_slot_gates`, slots given back from a `finally` as tasks in `_slot_tasks`."""

    spool: Spool
    _stopping: bool
    _slot_gates: dict[str, SlotGate]
    _slot_tasks: set[asyncio.Task[None]]

    def _slot_gate(self, backend: str, limit: int) -> SlotGate:
        gate = self._slot_gates.get(backend)
        if gate is None or gate.limit != limit:  # new, or the limit changed on a reload
            # a spool that signals every release needs the poll only for expired slots
            old, gate = (
                gate,
                SlotGate(limit, SLOT_POLL_SIGNALLED if self.spool.signals else SLOT_BACKOFF),
            )
            if old is not None:
                gate.held = old.held  # the rows this process holds stay its own
            self._slot_gates[backend] = gate
        return gate

    def _slot_freed(self, backend: str) -> None:
        gate = self._slot_gates.get(backend)
        if gate is not None:
            gate.freed()

    async def _take_slot(self, backend: str, limit: int, msg_id: int) -> int | None:
        """A call slot of `backend` for mail `msg_id` (the label of its spool row): one handed
        over by another of this process's mails, or a new one from the spool; None when none
        came within SLOT_WAIT. The caller gives it back with `_give_slot`."""
        gate = self._slot_gate(backend, limit)
        deadline = time.monotonic() + SLOT_WAIT
        ask = gate.may_ask()
        while True:
            woken = gate.waiter()
            taken: int | None = None
            try:
                # one of this process's mails at a time asks the spool for one more slot (the
                # others wait for a hand-over or for its answer); a label is one row: never a
                # second row under a label this process holds
                if ask and not gate.trying:
                    if len(gate.held) < limit and msg_id not in gate.held:
                        gate.trying = True
                        try:
                            got = await self.spool.acquire_slot(backend, limit, msg_id)
                        finally:
                            gate.trying = False
                        if got:
                            gate.got()
                            gate.held.add(msg_id)
                            taken = msg_id
                            woken.cancel()
                            if len(gate.held) < limit:
                                gate.freed()  # there may be more: the next waiter asks at once
                            return msg_id
                        gate.missed()
                    elif len(gate.held) < limit:
                        gate.poll_later()  # its own label is lent out: the next waiter asks
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping:
                    return None
                # a hand-over, a release or the process's poll wakes us; else the deadline
                await asyncio.wait({woken}, timeout=left)
                if woken.done() and woken.result() is not None:
                    taken = woken.result()
                    return taken
                ask = woken.done()
            finally:
                if not woken.done():
                    woken.cancel()
                elif not woken.cancelled() and (handed := woken.result()) not in (None, taken):
                    # handed a slot it does not use (it took one from the spool meanwhile, or
                    # timed out, stopped, was cancelled): on to the next waiter or back
                    self._give_later(backend, handed)

    async def _give_slot(self, backend: str, label: int) -> None:
        """A mail's calls are over: its slot goes to the next mail of this process that waits
        for one, at once; when none does (or the worker stops), back to the spool."""
        gate = self._slot_gates[backend]
        if not self._stopping and label in gate.held and gate.hand_over(label):
            return
        gate.held.discard(label)
        try:
            with contextlib.suppress(SpoolError):  # unreleased, it expires with the lease
                await self.spool.release_slot(backend, label)
        finally:
            gate.freed()  # a mail of this process that came to wait meanwhile tries the spool

    def _give_later(self, backend: str, label: int) -> None:
        task = asyncio.get_running_loop().create_task(self._give_slot(backend, label))
        self._slot_tasks.add(task)
        task.add_done_callback(self._slot_tasks.discard)

    def _held_slots(self) -> set[int]:
        return set().union(*(g.held for g in self._slot_gates.values()))
