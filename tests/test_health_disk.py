"""`[spool] min_free`: /healthz fails, saying why, when the spool's file system runs low."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import load_config
from gateway.health import HealthServer
from gateway.metrics import Metrics
from gateway.status import StatusBoard

ROOT = Path(__file__).resolve().parent.parent


def server(free: int | None, min_free: int) -> HealthServer:
    h = HealthServer(
        "127.0.0.1",
        0,
        StatusBoard(),
        Metrics(),
        queue_info=lambda: {"oldest_queued_age": None},
        oldest_queued_max=900,
        backend_down_max=300,
        disk_free=(lambda: free) if free is not None else None,
        min_free=min_free,
    )
    h.started = True
    return h


def test_enough_space_is_ok_and_reported() -> None:
    code, body = server(10 * 2**30, 256 * 2**20).report()
    assert code == 200
    assert body["disk"] == {"free": 10 * 2**30, "min_free": 256 * 2**20}


def test_below_min_free_fails_with_the_reason() -> None:
    code, body = server(100 * 2**20, 256 * 2**20).report()
    assert code == 503
    assert body["problems"] == [
        "spool: 100 MiB free on its file system, below [spool] min_free (256 MiB):"
        " mail will soon be refused"
    ]


def test_unreadable_free_space_is_a_problem() -> None:
    def broken() -> int:
        raise OSError("gone")

    h = server(None, 1)
    h.disk_free = broken
    code, body = h.report()
    assert code == 503 and "cannot read the free space" in body["problems"][0]


@pytest.mark.parametrize(
    ("value", "expected"), [('"2GiB"', 2 * 2**30), ("1000", 1000), ('"0"', 0), ('"1GB"', 10**9)]
)
def test_min_free_units(tmp_path: Path, value: str, expected: int) -> None:
    text = (ROOT / "config.example.toml").read_text()
    text = text.replace('min_free = "256MiB"', f"min_free = {value}")
    (tmp_path / "config.toml").write_text(text)
    assert load_config(tmp_path / "config.toml").spool.min_free == expected
