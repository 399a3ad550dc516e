"""Fixtures shared by the simulator and backend tests: the simulators on port 0, a client for them."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from gateway.simulators.server import Simulators
from tests.pg_server import PostgresServer

# Test files that drive real processes for a long time (drills, installs): collected first, so
# that with the test files spread over processes (scripts/test, pytest-xdist --dist loadfile) they
# start at once instead of one of them running alone at the end. The order of the other files, and
# of the tests within a file, is unchanged.
SLOW_FIRST = (
    "test_install.py",
    "test_stop_after_burst.py",
    "test_cluster.py",
    "test_secrets_leak.py",
    "test_lifecycle.py",
    "test_crash_drill.py",
    "test_config_check.py",
    "test_spool_copy.py",
    "test_nodes.py",
    "test_hostile_endpoint.py",
    "test_metrics_coverage.py",
    "test_contract_suite.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST)

    items.sort(key=rank)  # stable: each file's own order is kept


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


@pytest.fixture(scope="module")
def pg() -> Iterator[PostgresServer]:
    """A private PostgreSQL server on loopback, one per test module that asks for it."""
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
