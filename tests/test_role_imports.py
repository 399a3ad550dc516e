"""Each process of the daemon loads only the libraries of its role (start-up CPU: every worker
start and restart pays its imports), and the worker's metric lines of one event-loop turn go to
the intake in one write."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from pathlib import Path

from harness import free_port, write_config

from gateway.metrics import Metrics
from gateway.status import StatusBoard
from gateway.workerproc import EventMetrics, apply_event

# a role's Daemon.startup() in a process of its own; prints the modules loaded then
ROLE_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from gateway.app import Daemon
from gateway.config import load_config

async def main():
    d = Daemon(load_config(Path(sys.argv[2])), role=sys.argv[1])
    await d.startup()
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in WATCHED or m in WATCHED)
    await d.shutdown()
    print("MODULES " + json.dumps(loaded), file=sys.stderr)

WATCHED = set(sys.argv[3].split(","))
asyncio.run(main())
"""

WATCHED = (
    "zeep",
    "httpx",
    "aiosmtplib",
    "dkim",
    "dns",
    "aiohttp",
    "aiosmtpd",
    "gateway.worker",
    "gateway.health",
    "gateway.intake.smtp",
    "gateway.backends.superoffice_soap",
)


def _loaded(role: str, config: Path) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-c", ROLE_SCRIPT, role, str(config), ",".join(WATCHED)],
        cwd=config.parent,
        stdin=subprocess.PIPE,  # the worker role reads wake-ups from it
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("MODULES ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return set(json.loads(lines[-1].removeprefix("MODULES ")))


def test_each_role_loads_only_its_own_stack(tmp_path: Path) -> None:
    config = write_config(tmp_path, sim_http=free_port(), sim_smtp=free_port())
    intake = _loaded("intake", config)  # also starts (and stops) the worker process
    assert intake & {"gateway.health", "gateway.intake.smtp", "aiohttp", "aiosmtpd"} == {
        "gateway.health",
        "gateway.intake.smtp",
        "aiohttp",
        "aiosmtpd",
    }
    # no pipeline: no worker, no backend module or its HTTP/SOAP stack, no SMTP client, no DKIM
    assert not intake & {
        "gateway.worker",
        "gateway.backends.superoffice_soap",
        "zeep",
        "httpx",
        "aiosmtplib",
        "dkim",
        "dns",
    }, intake
    worker = _loaded("worker", config)
    assert {"gateway.worker", "gateway.backends.superoffice_soap", "zeep", "httpx"} <= worker
    assert "aiosmtplib" in worker  # the acknowledgement sender is built with the worker
    # no listeners, and DKIM only once a mail asks for the gateway's own check
    assert not worker & {
        "gateway.health",
        "gateway.intake.smtp",
        "aiohttp",
        "aiosmtpd",
        "dkim",
        "dns",
    }, worker


class _CountingOut(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


async def test_metric_lines_of_one_loop_turn_go_out_in_one_write() -> None:
    out = _CountingOut()
    events = EventMetrics(out)
    events.outcome("done", "smtp", "support", "superoffice-soap")
    events.backend_latency("superoffice-soap", 0.25, True)
    events.count("acks_withheld", reason="rate_limit")
    assert out.writes == 0  # not yet: at the end of this turn
    await asyncio.sleep(0)
    assert out.writes == 1
    lines = out.getvalue().splitlines()
    assert [json.loads(ln)["t"] for ln in lines] == ["outcome", "latency", "count"]
    # the next turn's lines make the next write; nothing is written twice
    events.recovered_mails(2, 1)
    await asyncio.sleep(0)
    assert out.writes == 2 and len(out.getvalue().splitlines()) == 4
    # the parent folds them as before
    metrics, board = Metrics(), StatusBoard()
    for ln in out.getvalue().splitlines():
        apply_event(json.loads(ln), board, metrics)
    text = metrics.render().decode()
    assert 'gateway_acks_withheld_total{reason="rate_limit"} 1.0' in text
    assert 'gateway_recovered_total{kind="requeued"} 2.0' in text
    assert (
        'gateway_backend_latency_seconds_count{backend="superoffice-soap",result="ok"} 1.0' in text
    )


def test_metric_line_outside_a_running_loop_goes_out_at_once() -> None:
    out = _CountingOut()
    events = EventMetrics(out)
    events.recovered_mails(1, 0)
    assert out.writes == 1 and json.loads(out.getvalue())["t"] == "recovered"
    events.flush()  # nothing pending: no empty write
    assert out.writes == 1
