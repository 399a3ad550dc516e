"""The one retry policy: exponential backoff with jitter, bounded, and its defaults in one place.

`Backoff.delay(failures)` is the wait before the next try after `failures` failures in a row:
`base * 2 ** (failures - 1)`, capped at `cap`, then multiplied by a random factor between
`1 - jitter` and 1 (so that many waiters do not come back at the same instant). Every retrying
part of the gateway uses it, each with the bounds that fit what it retries:

    user                     base     cap      jitter  fed by
    worker (a mail)          10 s     3600 s   0.5     [retry] base / max_delay (+ deadline)
    ack sender (one ack)     2 s      600 s    0.5     ACK below (attempts bound: max_attempts)
    IMAP poller              1 s      300 s    0.5     [[imap]] retry knobs (tests shorten them)
    worker supervisor        1 s      30 s     0        SUPERVISOR below (restarts of the worker)
    cluster call slot wait   0.02 s   0.25 s   0.5     SLOT_BACKOFF below (all of a backend's slots busy;
                                                       one ask per worker process, not per mail)
      ... with signals       0.25 s   2 s      0.5     SLOT_POLL_SIGNALLED below (the spool signals every
                                                       release: the poll only finds expired slots)
    slot requeue             1 s      1 s      0.8     SLOT_REQUEUE below (gave up waiting: queued again)

A `Retry-After` from a system overrides the computed delay where the worker gets one.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_BASE = 10.0  # [retry] base: first delay of a mail's retries, seconds
DEFAULT_CAP = 3600.0  # [retry] max_delay: the longest single delay, seconds
DEFAULT_JITTER = 0.5


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter (see the module docstring)."""

    base: float = DEFAULT_BASE
    cap: float = DEFAULT_CAP
    jitter: float = DEFAULT_JITTER  # 0: no randomness; 0.5: between half and all of the ceiling

    def ceiling(self, failures: int) -> float:
        """The delay before jitter after `failures` failures in a row (1 = the first)."""
        return min(self.cap, self.base * 2.0 ** min(max(0, failures - 1), 64))

    def delay(
        self,
        failures: int,
        *,
        ceiling: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """The wait before the next try; `ceiling` replaces the computed one (a caller's cap)."""
        top = self.ceiling(failures) if ceiling is None else ceiling
        return top * (1.0 - self.jitter * rand())

    def replace(self, **changes: float) -> Backoff:
        return dataclasses.replace(self, **changes)


WORKER = Backoff()
ACK = Backoff(base=2.0, cap=600.0)
IMAP = Backoff(base=1.0, cap=300.0)
SUPERVISOR = Backoff(base=1.0, cap=30.0, jitter=0.0)
SLOT_BACKOFF = Backoff(base=0.02, cap=0.25)
SLOT_POLL_SIGNALLED = Backoff(base=0.25, cap=2.0)
SLOT_REQUEUE = Backoff(base=1.0, cap=1.0, jitter=0.8)  # between 0.2 and 1 s
