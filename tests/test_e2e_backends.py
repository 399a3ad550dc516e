"""All four ticket systems end to end with the quick-start config: new tickets, acknowledgements
carrying each system's reference, follow-ups by In-Reply-To and by subject token, duplicates,
automatic mail and the autoreply loop drill."""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage

import pytest

from tests.harness import DaemonProcess, SimProcess, wait_for, write_config

SYSTEMS = {
    "support@example.com": "superoffice-soap",
    "sales@example.com": "superoffice-rest",
    "hosting@example.com": "interserver",
    "billing@example.com": "whmcs",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, DaemonProcess]]:
    tmp = tmp_path_factory.mktemp("e2e")
    sim = SimProcess(tmp)
    sim.start()
    cfg = write_config(tmp / "gw", sim_http=sim.http_port, sim_smtp=sim.smtp_port)
    daemon = DaemonProcess(cfg)
    daemon.start()
    yield sim, daemon
    daemon.stop()
    sim.stop()


def mail(
    subject: str,
    *,
    to: str,
    sender: str = "customer@example.org",
    body: str = "Hello",
    headers: dict[str, str] | None = None,
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Carla Customer <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@example.org>"
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0000"
    for k, v in (headers or {}).items():
        msg[k] = v
    msg.set_content(body)
    return msg


def send(port: int, msg: EmailMessage, *, envelope_from: str | None = None) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.send_message(msg, from_addr=envelope_from if envelope_from is not None else None)


def ticket(sim: SimProcess, title: str) -> dict | None:  # type: ignore[type-arg]
    found = [t for t in sim.get("/_sim/tickets") if t["title"] == title and t["messages"]]
    assert len(found) <= 1, found
    return found[0] if found else None


def acks_for(sim: SimProcess, ref: str) -> list[dict]:  # type: ignore[type-arg]
    return [m for m in sim.get("/_sim/outbox") if ref in m["subject"] and not m.get("source")]


@pytest.mark.parametrize("rcpt", list(SYSTEMS))
def test_each_demo_address_makes_a_ticket_in_its_system_and_the_ack_carries_its_ref(
    stack: tuple[SimProcess, DaemonProcess], rcpt: str
) -> None:
    sim, daemon = stack
    subject = f"new ticket via {rcpt} {uuid.uuid4().hex[:6]}"
    first = mail(subject, to=rcpt, body="First message")
    send(daemon.smtp_port, first)
    t = wait_for(lambda: ticket(sim, subject), timeout=30)
    assert t, daemon.log.read_text()[-2000:]
    assert t["system"] == SYSTEMS[rcpt]
    ack = wait_for(lambda: acks_for(sim, f"[Ticket #{t['ref']}]"), timeout=30)
    assert ack and len(ack) == 1
    assert ack[0]["rcpt_tos"] == ["customer@example.org"]

    # follow-up by In-Reply-To alone (subject without token)
    reply1 = mail(
        f"Re: {subject}",
        to=rcpt,
        body="Second message by In-Reply-To",
        headers={"In-Reply-To": ack[0]["headers"]["Message-ID"]},
    )
    send(daemon.smtp_port, reply1)
    # follow-up by subject token alone
    reply2 = mail(f"AW: {ack[0]['subject']}", to=rcpt, body="Third message by token")
    send(daemon.smtp_port, reply2)

    def three_messages() -> dict | None:  # type: ignore[type-arg]
        cur = ticket(sim, subject)
        return cur if cur and len(cur["messages"]) == 3 else None

    t2 = wait_for(three_messages, timeout=30)
    assert t2, (ticket(sim, subject), daemon.log.read_text()[-3000:])
    bodies = "\n".join(m["body"] for m in t2["messages"])
    assert "Second message by In-Reply-To" in bodies and "Third message by token" in bodies
    # follow-ups are not new tickets and get no second acknowledgement by default
    assert [x for x in sim.get("/_sim/tickets") if "Second message" in str(x["messages"][:1])] == []
    assert len(acks_for(sim, f"[Ticket #{t['ref']}]")) == 1


def test_same_mail_twice_over_smtp_and_pipe_makes_one_ticket(
    stack: tuple[SimProcess, DaemonProcess],
) -> None:
    sim, daemon = stack
    subject = f"duplicate delivery {uuid.uuid4().hex[:6]}"
    msg = mail(subject, to="support@example.com")
    send(daemon.smtp_port, msg)
    send(daemon.smtp_port, msg)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "deliver",
            "-c",
            str(daemon.config),
            "--rcpt",
            "support@example.com",
            "--from",
            "customer@example.org",
        ],
        input=bytes(msg),
        capture_output=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    t = wait_for(lambda: ticket(sim, subject), timeout=30)
    assert t
    time.sleep(2)  # give the copies time to be (wrongly) ticketed
    assert len([x for x in sim.get("/_sim/tickets") if x["title"] == subject]) == 1
    assert len(acks_for(sim, f"[Ticket #{t['ref']}]")) == 1


@pytest.mark.parametrize(
    "headers,envelope_from",
    [
        ({"Auto-Submitted": "auto-replied"}, None),
        ({"Precedence": "bulk"}, None),
        ({"List-Id": "<announce.lists.example.org>"}, None),
        ({"X-Autoreply": "yes"}, None),
        ({}, ""),  # null envelope sender
    ],
)
def test_automatic_mail_is_never_acknowledged(
    stack: tuple[SimProcess, DaemonProcess], headers: dict[str, str], envelope_from: str | None
) -> None:
    sim, daemon = stack
    subject = f"automatic {uuid.uuid4().hex[:6]}"
    send(
        daemon.smtp_port,
        mail(subject, to="support@example.com", headers=headers),
        envelope_from=envelope_from,
    )

    def outcome() -> str:
        import json

        out = daemon.gateway("queue", "-c", str(daemon.config), "ls", "--json")
        rows = [r for r in json.loads(out.stdout) if r["subject"] == subject]
        return rows[0]["state"] if rows and rows[0]["state"] not in ("queued", "processing") else ""

    state = wait_for(outcome, timeout=30)
    assert state in ("suppressed", "done")
    time.sleep(1)
    assert [m for m in sim.get("/_sim/outbox") if subject in m["subject"]] == []


@pytest.mark.parametrize("mode", ["rfc3834", "precedence", "bare"])
def test_autoreply_loop_drill_stops(stack: tuple[SimProcess, DaemonProcess], mode: str) -> None:
    sim, daemon = stack
    sender = f"loop-{mode}@example.org"
    sim.post("/_sim/autoreply", {"mode": mode, "smtp": f"127.0.0.1:{daemon.smtp_port}"})
    try:
        send(daemon.smtp_port, mail(f"loop drill {mode}", to="support@example.com", sender=sender))
        time.sleep(6)
        acks = [m for m in sim.get("/_sim/outbox") if m["rcpt_tos"] == [sender]]
        n1 = len(acks)
        time.sleep(3)
        n2 = len([m for m in sim.get("/_sim/outbox") if m["rcpt_tos"] == [sender]])
    finally:
        sim.post("/_sim/autoreply", {"mode": "off"})
    assert n1 == n2, "the exchange is still going on"
    if mode in ("rfc3834", "precedence"):
        assert n1 == 1  # the out-of-office reply is never answered
    else:
        assert 1 <= n1 <= 5  # bare: stopped by the per-sender limit (rate_limit = 5)


def test_token_of_an_unknown_ticket_makes_a_new_ticket_never_appends(
    stack: tuple[SimProcess, DaemonProcess],
) -> None:
    sim, daemon = stack
    subject = f"Re: [Ticket #987654] lost ticket {uuid.uuid4().hex[:6]}"
    # a sender of its own: the others here have used up the hourly acknowledgement limit
    sender = f"lost-{uuid.uuid4().hex[:6]}@example.org"
    send(
        daemon.smtp_port,
        mail(subject, to="support@example.com", body="about an old ticket", sender=sender),
    )
    t = wait_for(lambda: ticket(sim, subject), timeout=30)
    assert t and len(t["messages"]) == 1
    assert wait_for(lambda: acks_for(sim, f"[Ticket #{t['ref']}]"), timeout=30)


def test_follow_up_to_a_ticket_made_elsewhere_by_the_systems_own_token(
    stack: tuple[SimProcess, DaemonProcess],
) -> None:
    sim, daemon = stack
    made = sim.post(
        "/_sim/tickets",
        {
            "system": "whmcs",
            "id": "777",
            "ref": "XYZ-123456",
            "title": "made in WHMCS",
            "requester": "customer@example.org",
        },
    )
    send(
        daemon.smtp_port,
        mail(
            "Re: [Ticket ID: XYZ-123456] made in WHMCS",
            to="billing@example.com",
            body="reply to a ticket the gateway never saw",
        ),
    )

    def appended() -> bool:
        cur = [
            x for x in sim.get("/_sim/tickets") if x["system"] == "whmcs" and x["id"] == made["id"]
        ]
        return bool(cur and cur[0]["messages"])

    assert wait_for(appended, timeout=30), daemon.log.read_text()[-2000:]
    assert not [
        x
        for x in sim.get("/_sim/tickets")
        if x["title"].endswith("made in WHMCS") and x["id"] != "777"
    ]


def test_follow_up_to_a_closed_ticket_is_appended_and_reopens_it(
    stack: tuple[SimProcess, DaemonProcess],
) -> None:
    sim, daemon = stack
    subject = f"closing soon {uuid.uuid4().hex[:6]}"
    send(daemon.smtp_port, mail(subject, to="support@example.com"))
    t = wait_for(lambda: ticket(sim, subject), timeout=30)
    assert t
    sim.post(f"/_sim/tickets/{t['system']}/{t['id']}/close", {})
    send(
        daemon.smtp_port,
        mail(f"Re: [Ticket #{t['ref']}] {subject}", to="support@example.com", body="still broken"),
    )

    def reopened() -> dict | None:  # type: ignore[type-arg]
        cur = ticket(sim, subject)
        return cur if cur and len(cur["messages"]) == 2 else None

    cur = wait_for(reopened, timeout=30)
    assert cur and cur["status"] == "open"
