"""The one retry policy: exponential, capped, jittered within its bounds, defaults shared."""

from __future__ import annotations

from gateway import retry
from gateway.config import RetrySection
from gateway.worker import WorkerSettings


def test_delays_double_up_to_the_cap_and_jitter_stays_within_bounds() -> None:
    b = retry.Backoff(base=2.0, cap=30.0, jitter=0.5)
    assert [b.ceiling(n) for n in (1, 2, 3, 4, 5, 6, 100)] == [2, 4, 8, 16, 30, 30, 30]
    assert b.delay(3, rand=lambda: 0.0) == 8.0
    assert b.delay(3, rand=lambda: 1.0) == 4.0
    assert b.delay(3, ceiling=1.0, rand=lambda: 1.0) == 0.5
    assert retry.SUPERVISOR.delay(3) == 4.0  # no jitter: exact


def test_one_set_of_defaults() -> None:
    section = RetrySection()
    assert (section.base, section.max_delay) == (retry.WORKER.base, retry.WORKER.cap)
    settings = WorkerSettings()
    assert (settings.retry_base, settings.retry_max_delay) == (section.base, section.max_delay)
