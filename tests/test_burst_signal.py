"""The intake's burst signal to the worker: on while SMTP mail arrives above the rate, off soon
after, whatever the other intakes do meanwhile."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway import workerproc
from gateway.metrics import Metrics
from gateway.status import StatusBoard


async def test_burst_is_signalled_above_the_rate_and_ends_with_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(workerproc.time, "monotonic", lambda: now[0])
    sup = workerproc.WorkerSupervisor(Path("unused.toml"), StatusBoard(), Metrics())
    sup.yield_rate = 200  # 50 mails in a 0.25 s window
    for _ in range(10):
        sup.wake(smtp=True)
    assert not sup._in_burst()
    for _ in range(60):
        sup.wake(smtp=True)
    assert sup._in_burst()
    assert sup.metrics.intake_bursts._value.get() == 1
    now[0] += 0.3
    sup.wake()  # an IMAP store: must not keep the worker stepping back
    assert sup._in_burst()  # still the last window's burst
    now[0] += 0.3
    sup.wake()
    assert not sup._in_burst()
