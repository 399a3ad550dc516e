"""What monitoring and admins see of the running daemon: /metrics counters that match what was
sent, /healthz per component, `gateway route --json` deciding exactly as the daemon then does,
and the standard library's own mail corpus going through to a recorded outcome."""

from __future__ import annotations

import email
import json
import smtplib
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import DaemonProcess, SimProcess, wait_for, write_config

CORPUS = Path(email.__file__).parent.parent / "test" / "test_email" / "data"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, DaemonProcess]]:
    tmp = tmp_path_factory.mktemp("obs")
    sim = SimProcess(tmp)
    sim.start()
    cfg = write_config(tmp / "gw", sim_http=sim.http_port, sim_smtp=sim.smtp_port)
    daemon = DaemonProcess(cfg)
    daemon.start()
    yield sim, daemon
    daemon.stop()
    sim.stop()


def queue_rows(daemon: DaemonProcess) -> list[dict]:  # type: ignore[type-arg]
    out = daemon.gateway("queue", "-c", str(daemon.config), "ls", "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def settled(daemon: DaemonProcess) -> bool:
    return all(r["state"] not in ("queued", "processing", "deferred") for r in queue_rows(daemon))


def metric_values(daemon: DaemonProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"http://127.0.0.1:{daemon.health_port}/metrics").text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(values: dict, name: str) -> float:  # type: ignore[type-arg]
    return sum(v for (n, _), v in values.items() if n == name)


def test_metrics_parse_and_count_what_was_sent(stack: tuple[SimProcess, DaemonProcess]) -> None:
    _sim, daemon = stack
    before = metric_values(daemon)
    for i in range(5):
        msg = EmailMessage()
        msg["From"] = "metrics@example.org"
        msg["To"] = "billing@example.com"
        msg["Subject"] = f"metrics {i} {uuid.uuid4().hex[:6]}"
        msg["Message-ID"] = f"<{uuid.uuid4().hex}@example.org>"
        msg.set_content("count me")
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as s:
            s.send_message(msg)
    bulk = EmailMessage()
    bulk["From"] = "news@example.org"
    bulk["To"] = "billing@example.com"
    bulk["Subject"] = "newsletter"
    bulk["Precedence"] = "bulk"
    bulk["Message-ID"] = f"<{uuid.uuid4().hex}@example.org>"
    bulk.set_content("buy")
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as s:
        s.send_message(bulk)
    assert wait_for(lambda: settled(daemon), timeout=30)
    after = metric_values(daemon)
    assert total(after, "gateway_received_total") - total(before, "gateway_received_total") == 6
    assert total(after, "gateway_ticketed_total") - total(before, "gateway_ticketed_total") == 5
    assert total(after, "gateway_suppressed_total") - total(before, "gateway_suppressed_total") == 1
    labels = [dict(lbl) for (n, lbl), _ in after.items() if n == "gateway_ticketed_total"]
    assert {"intake": "smtp", "rule": "billing", "backend": "whmcs"} in labels
    assert ("gateway_queue_depth", ()) in after
    text = httpx.get(f"http://127.0.0.1:{daemon.health_port}/metrics").text
    assert "example.org" not in text and "metrics " not in text  # no addresses, no content


def test_healthz_lists_components_and_fails_when_a_backend_is_refused(
    stack: tuple[SimProcess, DaemonProcess],
) -> None:
    sim, daemon = stack
    url = f"http://127.0.0.1:{daemon.health_port}/healthz"
    assert httpx.get(url).status_code == 200
    sim.post("/_sim/fault", {"system": "interserver", "mode": "auth"})
    try:
        msg = EmailMessage()
        msg["From"] = "health@example.org"
        msg["To"] = "hosting@example.com"
        msg["Subject"] = "health check mail"
        msg.set_content("x")
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as s:
            s.send_message(msg)
        r = wait_for(
            lambda: (lambda r: r if r.status_code == 503 else None)(httpx.get(url)), timeout=30
        )
        assert r is not None
        body = r.json()
        assert body["components"]["backend:interserver"]["status"] == "down"
        assert any("interserver" in p for p in body["problems"])
        assert "health@example.org" not in r.text
    finally:
        sim.post("/_sim/fault", {"system": "interserver", "mode": "ok"})
    assert wait_for(lambda: httpx.get(url).status_code == 200, timeout=30)
    assert wait_for(
        lambda: [t for t in sim.get("/_sim/tickets") if t["title"] == "health check mail"],
        timeout=30,
    )


SAMPLES = {
    "plain.eml": b"From: Ann <ann@example.org>\r\nTo: sales@example.com\r\nSubject: quote\r\n"
    b"Message-ID: <route-1@example.org>\r\n\r\nPlease send a quote.\r\n",
    "billing.eml": b"From: bob@example.net\r\nTo: billing@example.com\r\nSubject: invoice 42\r\n"
    b"Message-ID: <route-2@example.org>\r\n\r\nWrong amount.\r\n",
    "auto.eml": b"From: ooo@example.net\r\nTo: support@example.com\r\nSubject: Out of office\r\n"
    b"Auto-Submitted: auto-replied\r\nMessage-ID: <route-3@example.org>\r\n\r\nAway.\r\n",
    "hosting.eml": b"From: Cy <cy@example.net>\r\nTo: hosting@example.com\r\nSubject: server down\r\n"
    b"Message-ID: <route-4@example.org>\r\nX-Originating-IP: [198.51.100.7]\r\n\r\nHelp.\r\n",
}


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_route_dry_run_matches_what_the_daemon_does(
    stack: tuple[SimProcess, DaemonProcess], tmp_path: Path, name: str
) -> None:
    sim, daemon = stack
    path = tmp_path / name
    path.write_bytes(SAMPLES[name])
    out = daemon.gateway("route", "-c", str(daemon.config), str(path), "--json")
    assert out.returncode == 0, out.stderr
    decision = json.loads(out.stdout)
    assert set(decision) >= {"rule", "backend", "action", "ticket", "followup_of", "ack", "reasons"}
    msg = email.message_from_bytes(SAMPLES[name])
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as s:
        s.sendmail(msg["From"].split("<")[-1].strip(">"), [msg["To"]], SAMPLES[name])
    subject = msg["Subject"]

    def row() -> dict | None:  # type: ignore[type-arg]
        rows = [
            r
            for r in queue_rows(daemon)
            if r["subject"] == subject and r["state"] not in ("queued", "processing")
        ]
        return rows[0] if rows else None

    r = wait_for(row, timeout=30)
    assert r is not None
    if decision["action"] == "suppress":
        assert r["state"] == "suppressed"
        return
    assert r["state"] == "done", r
    assert r["rule"] == decision["rule"]
    assert r["backend"] == decision["backend"]
    t = wait_for(
        lambda: [t for t in sim.get("/_sim/tickets") if t["title"] == subject and t["messages"]]
    )
    assert t and len(t) == 1
    sys_of = {
        "superoffice-soap": "superoffice-soap",
        "superoffice-rest": "superoffice-rest",
        "interserver": "interserver",
        "whmcs": "whmcs",
    }
    assert t[0]["system"] == sys_of[decision["backend"]]


@pytest.mark.skipif(not CORPUS.is_dir(), reason="the stdlib email test corpus is not installed")
def test_stdlib_corpus_reaches_a_recorded_outcome(stack: tuple[SimProcess, DaemonProcess]) -> None:
    _sim, daemon = stack
    files = sorted(CORPUS.glob("msg_*.txt"))
    assert files
    ids = []
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as s:
        for f in files:
            raw = f.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
            _, _resp = s.sendmail("corpus@example.org", ["support@example.com"], raw) or (None, b"")
            s.noop()
            ids.append(f.name)
    assert wait_for(lambda: settled(daemon), timeout=120, interval=0.5)
    rows = [r for r in queue_rows(daemon) if r["state"]]
    states = [r["state"] for r in rows]
    assert "queued" not in states and "processing" not in states
    dead = [r for r in rows if r["state"] == "dead"]
    # quarantine is for what truly cannot be read: none of the corpus qualifies
    assert dead == [], [(r["id"], r["last_error"][:200]) for r in dead]
