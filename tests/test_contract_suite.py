"""One contract suite for the four ticket systems, through the running daemon: each fault the
simulators can inject (error, slow, down, reject) ends as the contract says: retried until the
ticket exists, or dead-lettered with the system's own message and replayed by `queue retry`."""

from __future__ import annotations

import json
import smtplib
import uuid
from collections.abc import Iterator
from email.message import EmailMessage

import pytest

from tests.harness import DaemonProcess, SimProcess, wait_for, write_config

BACKENDS = {
    "superoffice-soap": "support@example.com",
    "superoffice-rest": "sales@example.com",
    "interserver": "hosting@example.com",
    "whmcs": "billing@example.com",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, DaemonProcess]]:
    tmp = tmp_path_factory.mktemp("contract")
    sim = SimProcess(tmp)
    sim.start()
    cfg = write_config(tmp / "gw", sim_http=sim.http_port, sim_smtp=sim.smtp_port)
    daemon = DaemonProcess(cfg)
    daemon.start()
    yield sim, daemon
    daemon.stop()
    sim.stop()


@pytest.fixture(autouse=True)
def clear_faults(stack: tuple[SimProcess, DaemonProcess]) -> Iterator[None]:
    yield
    stack[0].post("/_sim/fault", {"mode": "ok"})


def send(daemon: DaemonProcess, to: str, subject: str) -> None:
    msg = EmailMessage()
    msg["From"] = f"contract-{uuid.uuid4().hex[:8]}@example.org"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@example.org>"
    msg.set_content("contract suite")
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as s:
        s.send_message(msg)


def ticketed(sim: SimProcess, system: str, subject: str) -> list[dict]:  # type: ignore[type-arg]
    return [
        t
        for t in sim.get("/_sim/tickets")
        if t["title"] == subject and t["system"] == system and t["messages"]
    ]


def row_for(daemon: DaemonProcess, subject: str) -> dict | None:  # type: ignore[type-arg]
    out = daemon.gateway("queue", "-c", str(daemon.config), "ls", "--json")
    rows = [r for r in json.loads(out.stdout) if r["subject"] == subject]
    return rows[0] if rows else None


@pytest.mark.parametrize("system", list(BACKENDS))
@pytest.mark.parametrize(
    "fault",
    [
        {"mode": "error", "count": 2},
        {"mode": "slow", "latency_ms": 400, "count": 3},
        {"mode": "down", "seconds": 2},
    ],
    ids=["error", "slow", "down"],
)
def test_transient_faults_are_retried_until_the_ticket_exists(
    stack: tuple[SimProcess, DaemonProcess], system: str, fault: dict
) -> None:  # type: ignore[type-arg]
    sim, daemon = stack
    sim.post("/_sim/fault", {"system": system, **fault})
    subject = f"{fault['mode']} {system} {uuid.uuid4().hex[:6]}"
    send(daemon, BACKENDS[system], subject)
    tickets = wait_for(lambda: ticketed(sim, system, subject), timeout=60)
    assert tickets and len(tickets) == 1, daemon.log.read_text()[-2000:]
    assert wait_for(lambda: (row_for(daemon, subject) or {}).get("state") == "done", timeout=30)


@pytest.mark.parametrize("system", list(BACKENDS))
def test_a_rejection_is_dead_lettered_with_the_systems_message_and_replayed(
    stack: tuple[SimProcess, DaemonProcess], system: str
) -> None:
    sim, daemon = stack
    sim.post("/_sim/fault", {"system": system, "mode": "reject", "count": 20})
    subject = f"reject {system} {uuid.uuid4().hex[:6]}"
    send(daemon, BACKENDS[system], subject)
    row = wait_for(
        lambda: (lambda r: r if r and r["state"] == "dead" else None)(row_for(daemon, subject)),
        timeout=60,
    )
    assert row, row_for(daemon, subject)
    assert row["last_error"].startswith(f"{system}:")
    assert len(row["last_error"]) > len(system) + 5  # the system's own words follow
    sim.post("/_sim/fault", {"system": system, "mode": "ok"})
    out = daemon.gateway("queue", "-c", str(daemon.config), "retry", str(row["id"]))
    assert out.returncode == 0, out.stderr
    tickets = wait_for(lambda: ticketed(sim, system, subject), timeout=60)
    assert tickets and len(tickets) == 1


@pytest.mark.parametrize("system", list(BACKENDS))
def test_refused_credentials_pause_the_backend_and_nothing_is_dead_lettered(
    stack: tuple[SimProcess, DaemonProcess], system: str
) -> None:
    sim, daemon = stack
    sim.post("/_sim/fault", {"system": system, "mode": "auth"})
    sim.post("/_sim/sessions/expire", {})
    subject = f"auth {system} {uuid.uuid4().hex[:6]}"
    send(daemon, BACKENDS[system], subject)
    row = wait_for(
        lambda: (lambda r: r if r and r["state"] == "deferred" else None)(row_for(daemon, subject)),
        timeout=60,
    )
    assert row and "unavailable" in row["last_error"]
    sim.post("/_sim/fault", {"system": system, "mode": "ok"})
    assert wait_for(lambda: ticketed(sim, system, subject), timeout=60)
    assert (row_for(daemon, subject) or {}).get("state") == "done"
