"""The walking skeleton end to end, as a user runs it: `gateway simulate` + `gateway run` with the
quick-start config; mail in over SMTP, one ticket in the simulator, one acknowledgement out."""

from __future__ import annotations

import smtplib
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from tests.harness import DaemonProcess, SimProcess, wait_for, write_config


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[SimProcess, DaemonProcess]]:
    sim = SimProcess(tmp_path)
    sim.start()
    cfg = write_config(tmp_path / "gw", sim_http=sim.http_port, sim_smtp=sim.smtp_port)
    daemon = DaemonProcess(cfg)
    daemon.start()
    yield sim, daemon
    daemon.stop()
    sim.stop()


def send(
    port: int,
    subject: str,
    *,
    to: str = "support@example.com",
    body: str = "Please help",
    sender: str = "customer@example.org",
    msgid: str | None = None,
) -> None:
    msg = EmailMessage()
    msg["From"] = f"Carla Customer <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = msgid or f"<{uuid.uuid4().hex}@example.org>"
    msg.set_content(body)
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.send_message(msg, from_addr=sender, to_addrs=[to])


def tickets_with(sim: SimProcess, title: str) -> list[dict]:  # type: ignore[type-arg]
    return [t for t in sim.get("/_sim/tickets") if t["title"] == title]


def test_mail_becomes_one_ticket_and_one_acknowledgement(
    stack: tuple[SimProcess, DaemonProcess],
) -> None:
    sim, daemon = stack
    subject = "Grüße: the printer is on fire"
    send(daemon.smtp_port, subject, body="It smokes.\nPlease help.")
    # newTicket and addMessage are two calls: wait until the message is on the ticket
    tickets = wait_for(lambda: [t for t in tickets_with(sim, subject) if t["messages"]], timeout=30)
    assert tickets and len(tickets) == 1
    t = tickets[0]
    assert t["system"] == "superoffice-soap"
    assert len(t["messages"]) == 1
    assert "It smokes." in t["messages"][0]["body"]
    assert "customer@example.org" in t["messages"][0]["body"]  # the real sender heads the text
    acks = wait_for(
        lambda: [m for m in sim.get("/_sim/outbox") if f"[Ticket #{t['ref']}]" in m["subject"]]
    )
    assert acks and len(acks) == 1
    ack = acks[0]
    assert ack["rcpt_tos"] == ["customer@example.org"]
    assert ack["mail_from"] in ("", "<>")  # null envelope sender
    assert ack["headers"].get("Auto-Submitted") == "auto-replied"
    # nothing more arrives later
    assert len(tickets_with(sim, subject)) == 1


def test_unknown_recipient_is_refused_and_nothing_spooled(
    stack: tuple[SimProcess, DaemonProcess],
) -> None:
    _sim, daemon = stack
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port) as s:
        s.ehlo()
        s.mail("x@example.org")
        code, _ = s.rcpt("nobody@example.net")
    assert code == 550
    out = daemon.gateway("queue", "-c", str(daemon.config), "ls", "--json")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == b"[]"


def test_backend_down_mail_waits_then_is_ticketed_and_acked_after(
    stack: tuple[SimProcess, DaemonProcess],
) -> None:
    sim, daemon = stack
    sim.post("/_sim/fault", {"system": "superoffice-soap", "mode": "down", "seconds": 4})
    subjects = [f"outage {i}" for i in range(5)]
    for s in subjects:
        send(daemon.smtp_port, s)
    # no acknowledgement may exist before its ticket: while the fault lasts there is neither
    assert not [m for m in sim.get("/_sim/outbox") if m["subject"].endswith(tuple(subjects))]
    done = wait_for(lambda: all(len(tickets_with(sim, s)) == 1 for s in subjects), timeout=60)
    assert done, daemon.log.read_text()[-3000:]
    acks = wait_for(
        lambda: len([m for m in sim.get("/_sim/outbox") if "outage" in m["subject"]]) == 5
    )
    assert acks
    for s in subjects:
        assert len(tickets_with(sim, s)) == 1


def test_permanent_rejection_dead_letters_with_the_reason_and_retry_replays(
    stack: tuple[SimProcess, DaemonProcess],
) -> None:
    sim, daemon = stack
    sim.post("/_sim/fault", {"system": "superoffice-soap", "mode": "reject", "count": 50})
    send(daemon.smtp_port, "rejected one")

    def dead() -> list[dict]:  # type: ignore[type-arg]
        import json

        out = daemon.gateway("queue", "-c", str(daemon.config), "ls", "--state", "dead", "--json")
        return json.loads(out.stdout or b"[]")

    rows = wait_for(dead, timeout=30)
    assert rows and "code 8" in rows[0]["last_error"]
    sim.post("/_sim/fault", {"system": "superoffice-soap", "mode": "ok"})
    out = daemon.gateway("queue", "-c", str(daemon.config), "retry", str(rows[0]["id"]))
    assert out.returncode == 0, out.stderr
    assert wait_for(lambda: len(tickets_with(sim, "rejected one")) == 1, timeout=30)


def test_an_auto_reply_to_an_unknown_ticket_is_suppressed_and_a_person_s_reply_ticketed(
    stack: tuple[SimProcess, DaemonProcess],
) -> None:
    import json

    sim, daemon = stack

    def rows_of(subject: str) -> list[dict]:  # type: ignore[type-arg]
        out = daemon.gateway("queue", "-c", str(daemon.config), "ls", "--json")
        return [r for r in json.loads(out.stdout or b"[]") if r.get("subject") == subject]

    # an out-of-office answer to an old or forged token: automatic mail, no ticket of its own
    msg = EmailMessage()
    msg["From"] = "Otto Office <otto@example.org>"
    msg["To"] = "support@example.com"
    msg["Subject"] = auto = "Automatic reply: [Ticket #4242] Your request"
    msg["Auto-Submitted"] = "auto-replied"
    msg.set_content("I am out of the office until Monday.")
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as s:
        s.send_message(msg, from_addr="otto@example.org", to_addrs=["support@example.com"])
    # a person answering with the same unknown token: a new ticket, as before
    send(daemon.smtp_port, human := "Re: [Ticket #4242] Your request", body="Still broken.")
    assert wait_for(lambda: [t for t in tickets_with(sim, human) if t["messages"]], timeout=30)
    rows = wait_for(lambda: [r for r in rows_of(auto) if r["state"] == "suppressed"], timeout=30)
    assert rows and len(rows_of(auto)) == 1
    why = rows[0]["last_error"]
    assert "unknown to superoffice-soap" in why and "new ticket" not in why
    assert "suppressed: automatic mail that follows up no open ticket" in why
    assert tickets_with(sim, auto) == []
    assert not [m for m in sim.get("/_sim/outbox") if m["rcpt_tos"] == ["otto@example.org"]]


def test_health_reports_components(stack: tuple[SimProcess, DaemonProcess]) -> None:
    _, daemon = stack
    r = httpx.get(f"http://127.0.0.1:{daemon.health_port}/healthz")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert {"spool", "rules", "intake:smtp", "backend:superoffice-soap"} <= set(body["components"])


def test_smtp_burst_is_ticketed_once_per_mail(tmp_path: Path) -> None:
    import concurrent.futures

    sim = SimProcess(tmp_path)
    sim.start()
    cfg = write_config(tmp_path / "gw", sim_http=sim.http_port, sim_smtp=sim.smtp_port)
    daemon = DaemonProcess(cfg)
    daemon.start()
    try:
        tag = uuid.uuid4().hex[:8]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: send(daemon.smtp_port, f"burst {tag} {i}"), range(60)))

        def all_ticketed() -> bool:
            titles = [t["title"] for t in sim.get("/_sim/tickets")]
            return sum(1 for t in titles if t.startswith(f"burst {tag} ")) >= 60

        assert wait_for(all_ticketed, 60)
        titles = [t["title"] for t in sim.get("/_sim/tickets") if t["title"].startswith("burst")]
        assert sorted(titles) == sorted(f"burst {tag} {i}" for i in range(60))  # once each
    finally:
        daemon.stop()
        sim.stop()
