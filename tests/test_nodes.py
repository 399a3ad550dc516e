"""Node identity and worker processes, with real `gateway run` processes on a SQLite spool.

`[gateway] node` names the node in /healthz (with `spool.engine` and the worker processes alive)
and in `gateway queue ls` for every mail a worker holds; `[gateway] worker_processes = 2` runs two
worker processes that claim from one spool, each mail ticketed once.
"""

from __future__ import annotations

import json
import smtplib
from collections import Counter
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from tests.harness import DaemonProcess, SimProcess, wait_for, write_config


@pytest.fixture
def sim(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = SimProcess(tmp_path / "sim")
    s.start(timeout=90)  # several daemons and a database share the machine
    yield s
    s.stop()


def _send(port: int, subject: str, rcpt: str = "support@example.com") -> None:
    msg = EmailMessage()
    msg["From"] = "nodes@example.org"
    msg["To"] = rcpt
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@example.org>"
    msg.set_content("node test")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.send_message(msg)


def _health(d: DaemonProcess) -> dict:  # type: ignore[type-arg]
    return httpx.get(f"http://127.0.0.1:{d.health_port}/healthz", timeout=10).json()  # type: ignore[no-any-return]


def test_node_name_engine_and_two_worker_processes(sim: SimProcess, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "gw",
        sim_http=sim.http_port,
        sim_smtp=sim.smtp_port,
        replace={'node = ""': 'node = "alpha"', "worker_processes = 1": "worker_processes = 2"},
    )
    d = DaemonProcess(cfg)
    d.start(timeout=60)
    try:
        body = wait_for(
            lambda: (b := _health(d)) and len(b["spool"].get("workers", [])) == 2 and b, 30
        )
        assert body, _health(d)
        assert body["node"] == "alpha"
        assert body["spool"]["engine"] == "sqlite" and body["spool"]["ok"] is True
        assert body["spool"]["nodes"] == ["alpha"]
        assert sorted(w["owner"] for w in body["spool"]["workers"]) == ["alpha/0", "alpha/1"]
        assert {"worker", "worker:1"} <= set(body["components"])

        # a slow system keeps mails in hand: queue ls names the node and worker holding each
        sim.post("/_sim/fault", {"system": "superoffice-soap", "mode": "slow", "latency_ms": 8000})
        subjects = [f"node test {i}" for i in range(12)]
        for s in subjects:
            _send(d.smtp_port, s)

        def in_hand() -> list[dict]:  # type: ignore[type-arg]
            res = d.gateway("queue", "-c", str(cfg), "ls", "--json", "--state", "processing")
            assert res.returncode == 0, res.stderr
            return json.loads(res.stdout)  # type: ignore[no-any-return]

        held = wait_for(in_hand, 60)
        assert held and all(r["claimed_by"] in ("alpha/0", "alpha/1") for r in held), held
        text = d.gateway("queue", "-c", str(cfg), "ls").stdout.decode()
        assert any("processing" in line and " alpha/" in line for line in text.splitlines()), text
        sim.post("/_sim/fault", {"system": "superoffice-soap", "mode": "ok"})

        def all_ticketed() -> bool:
            titles = Counter(t["title"] for t in sim.get("/_sim/tickets"))
            return all(titles[s] >= 1 for s in subjects)

        assert wait_for(all_ticketed, 120), sim.get("/_sim/tickets")
        titles = Counter(t["title"] for t in sim.get("/_sim/tickets"))
        assert all(titles[s] == 1 for s in subjects), titles  # each mail once, by one worker
        res = d.gateway("queue", "-c", str(cfg), "ls", "--json")
        rows = json.loads(res.stdout)
        assert {r["state"] for r in rows} == {"done"}
        assert all(r["claimed_by"] == "" for r in rows)  # a finished mail holds no claim
    finally:
        assert d.stop(60) == 0, d.log.read_text()[-3000:]
