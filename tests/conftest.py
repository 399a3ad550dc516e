"""Fixtures shared by the simulator and backend tests: the simulators on port 0, a client for them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.simulators.server import Simulators


@pytest.fixture
async def sims() -> AsyncIterator[Simulators]:
    """All four simulators and the SMTP sink, on free loopback ports, in the test's loop."""
    s = Simulators(listen="127.0.0.1:0", smtp="127.0.0.1:0")
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def http(sims: Simulators) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the simulators (their `/_sim` API and the systems' endpoints)."""
    async with httpx.AsyncClient(base_url=sims.base_url, timeout=5) as client:
        yield client
