"""Through the daemon against the simulators as the vendors' sources describe the systems
(issue 16): InterServer masks, product rewrite and crash recovery; SuperOffice SOAP with an
installation's WSDL; WHMCS client replies and custom closed statuses."""

from __future__ import annotations

import json
import re
import smtplib
import time
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.harness import DaemonProcess, SimProcess, wait_for, write_config

MASK = re.compile(r"\[Ticket #([A-Z]{3}-\d{3}-\d{5})\]")


def mail(
    subject: str, *, to: str, sender: str = "carla@example.org", body: str = "Hello"
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Carla Customer <{sender}>"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@example.org>"
    msg["Date"] = "Mon, 23 Nov 2026 10:00:00 +0000"
    msg.set_content(body)
    return msg


def send(port: int, msg: EmailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=60) as s:
        s.send_message(msg)


def tickets(sim: SimProcess, system: str) -> list[dict]:  # type: ignore[type-arg]
    return [t for t in sim.get("/_sim/tickets") if t["system"] == system]


def settled(daemon: DaemonProcess) -> bool:
    out = daemon.gateway("queue", "-c", str(daemon.config), "stats")
    counts = json.loads(out.stdout)
    return counts["queued"] + counts["deferred"] + counts["processing"] == 0


def set_product(cfg: Path, product: str) -> None:
    rules = cfg.parent / "rules" / "10-demo.toml"
    text = rules.read_text()
    old = 'product = ""              # InterServer product (empty: none)'
    assert old in text
    rules.write_text(text.replace(old, f'product = "{product}"'))


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimProcess]:
    s = SimProcess(tmp_path)
    s.start()
    yield s
    s.stop()


def start(
    sim: SimProcess,
    directory: Path,
    *,
    product: str = "",
    replace: dict[str, str] | None = None,
) -> DaemonProcess:
    cfg = write_config(directory, sim_http=sim.http_port, sim_smtp=sim.smtp_port, replace=replace)
    if product:
        set_product(cfg, product)
    daemon = DaemonProcess(cfg)
    try:
        daemon.start()
    except BaseException:
        daemon.stop()  # came up too late: never leave it running
        raise
    return daemon


# ---------------------------------------------------------------- InterServer


def test_interserver_kill_between_create_and_record_recovers_one_ticket(
    sim: SimProcess, tmp_path: Path
) -> None:
    daemon = start(sim, tmp_path / "gw", product="VPS 42")
    try:
        # a first mail logs the daemon in, so the fault below hits api_openTicket itself
        send(daemon.smtp_port, mail("warm-up", to="hosting@example.com"))
        assert wait_for(lambda: tickets(sim, "interserver"), timeout=60), daemon.log.read_text()
        # the next api_openTicket takes effect at once, its answer comes 300 s late
        sim.post(
            "/_sim/fault",
            {"system": "interserver", "mode": "slow", "latency_ms": 300_000, "late_reply": True,
             "count": 1},
        )  # fmt: skip
        send(daemon.smtp_port, mail("Disk full", to="hosting@example.com", body="no space left"))

        def made() -> list[dict]:  # type: ignore[type-arg]
            return [t for t in tickets(sim, "interserver") if t["title"] == "VPS 42 : Disk full"]

        assert wait_for(made, timeout=60), daemon.log.read_text()[-3000:]
        time.sleep(0.3)  # the worker is waiting for the answer: the ticket is not recorded
        daemon.kill9()
        sim.post("/_sim/fault", {"system": "interserver", "mode": "ok"})
        daemon.start()
        assert wait_for(lambda: settled(daemon), timeout=120, interval=0.5)
        (ticket,) = made()  # exactly one: found again, not created twice
        assert ticket["messages"][0]["body"].startswith("VPS 42\n\n")
        rows = json.loads(daemon.gateway("queue", "-c", str(daemon.config), "ls", "--json").stdout)
        (row,) = [r for r in rows if r["subject"] == "Disk full"]
        assert row["state"] == "done"
        assert row["uncertain"]
        shown = daemon.gateway("queue", "-c", str(daemon.config), "show", str(row["id"]))
        assert ticket["ref"] in shown.stdout.decode()
        # the acknowledgement names the ticket by its mask
        acks = wait_for(
            lambda: [
                m for m in sim.get("/_sim/outbox") if f"[Ticket #{ticket['ref']}]" in m["subject"]
            ],
            timeout=60,
        )
        assert acks and len(acks) == 1, daemon.log.read_text()[-2000:]
    finally:
        daemon.stop()


def test_interserver_ack_carries_the_mask_and_a_reply_with_it_is_a_follow_up(
    sim: SimProcess, tmp_path: Path
) -> None:
    daemon = start(sim, tmp_path / "gw", product="Dedicated 7")
    try:
        send(daemon.smtp_port, mail("Reboot please", to="hosting@example.com", body="first"))
        ack = wait_for(
            lambda: [m for m in sim.get("/_sim/outbox") if "Reboot please" in m["subject"]],
            timeout=60,
        )
        assert ack, daemon.log.read_text()[-3000:]
        token = MASK.search(ack[0]["subject"])
        assert token, ack[0]["subject"]
        (t,) = tickets(sim, "interserver")
        assert t["id"] == t["ref"] == token.group(1)
        assert t["title"] == "Dedicated 7 : Reboot please"
        assert t["fields"]["user_ip"]  # never empty
        assert t["fields"]["box_auth_value"] == ""
        send(
            daemon.smtp_port,
            mail(f"Re: {ack[0]['subject']}", to="hosting@example.com", body="second"),
        )

        def two() -> dict | None:  # type: ignore[type-arg]
            cur = tickets(sim, "interserver")
            return cur[0] if len(cur) == 1 and len(cur[0]["messages"]) == 2 else None

        cur = wait_for(two, timeout=60)
        assert cur, (tickets(sim, "interserver"), daemon.log.read_text()[-3000:])
        assert cur["messages"][1]["body"].rstrip().endswith("second")
    finally:
        daemon.stop()


# ---------------------------------------------------------------- WHMCS


def test_whmcs_client_reply_and_custom_closed_status(sim: SimProcess, tmp_path: Path) -> None:
    daemon = start(
        sim,
        tmp_path / "gw",
        replace={
            'type = "whmcs"': 'type = "whmcs"\nclosed_statuses = ["Closed", "Resolved"]',
            'followup_closed = "append"': 'followup_closed = "new"',
        },
    )
    try:
        sim.post(
            "/_sim/clients",
            {"system": "whmcs", "email": "carla@example.org", "id": "42", "name": "Carla C"},
        )
        send(daemon.smtp_port, mail("Invoice 17", to="billing@example.com", body="too high"))
        ack = wait_for(
            lambda: [m for m in sim.get("/_sim/outbox") if "Invoice 17" in m["subject"]],
            timeout=60,
        )
        assert ack, daemon.log.read_text()[-3000:]
        (t,) = tickets(sim, "whmcs")
        assert t["fields"]["clientid"] == "42"
        assert f"[Ticket #{t['ref']}]" in ack[0]["subject"]
        send(
            daemon.smtp_port,
            mail(f"Re: {ack[0]['subject']}", to="billing@example.com", body="any news?"),
        )

        def replied() -> dict | None:  # type: ignore[type-arg]
            cur = tickets(sim, "whmcs")
            return cur[0] if len(cur) == 1 and len(cur[0]["messages"]) == 2 else None

        cur = wait_for(replied, timeout=60)
        assert cur, daemon.log.read_text()[-3000:]
        reply = cur["messages"][1]
        assert reply["author"] == "client:42"  # a client reply, not a guest's
        assert "name" not in reply["fields"] and "email" not in reply["fields"]
        assert reply["fields"]["noemail"] is True

        # the installation's own closed status: the closed-ticket policy ("new") applies
        sim.post(f"/_sim/tickets/whmcs/{t['id']}/close", {"status": "Resolved"})
        send(
            daemon.smtp_port,
            mail(f"Re: {ack[0]['subject']}", to="billing@example.com", body="still wrong"),
        )
        two = wait_for(lambda: len(tickets(sim, "whmcs")) == 2, timeout=60)
        assert two, (tickets(sim, "whmcs"), daemon.log.read_text()[-3000:])
        first, second = tickets(sim, "whmcs")
        assert len(first["messages"]) == 2 and first["status"] == "Resolved"
        assert "still wrong" in second["messages"][0]["body"]
        assert wait_for(lambda: settled(daemon), timeout=60)
        rows = json.loads(daemon.gateway("queue", "-c", str(daemon.config), "ls", "--json").stdout)
        last = max(rows, key=lambda r: r["id"])
        assert last["state"] == "done" and last["ticket_ref"] == second["ref"]
    finally:
        daemon.stop()


# ---------------------------------------------------------------- SuperOffice SOAP


def test_superoffice_soap_with_the_installations_wsdl(sim: SimProcess, tmp_path: Path) -> None:
    alt = f"{sim.url}/superoffice/soap/customer-alt"
    daemon = start(
        sim,
        tmp_path / "gw",
        replace={
            'type = "superoffice-soap"': f'type = "superoffice-soap"\nwsdl = "{alt}?wsdl"',
            '/superoffice/soap/customer"': '/superoffice/soap/customer-alt"',
            'followup_closed = "append"': 'followup_closed = "new"',
        },
    )
    try:
        assert "customer-alt" in daemon.config.read_text()
        send(daemon.smtp_port, mail("Printer jam", to="support@example.com", body="paper stuck"))
        ack = wait_for(
            lambda: [m for m in sim.get("/_sim/outbox") if "Printer jam" in m["subject"]],
            timeout=60,
        )
        assert ack, daemon.log.read_text()[-3000:]
        (t,) = tickets(sim, "superoffice-soap")
        assert f"[Ticket #{t['ref']}]" in ack[0]["subject"]
        assert t["messages"][0]["body"].rstrip().endswith("paper stuck")
        send(
            daemon.smtp_port,
            mail(f"Re: {ack[0]['subject']}", to="support@example.com", body="more"),
        )

        def two() -> dict | None:  # type: ignore[type-arg]
            cur = tickets(sim, "superoffice-soap")
            return cur[0] if len(cur) == 1 and len(cur[0]["messages"]) == 2 else None

        assert wait_for(two, timeout=60), daemon.log.read_text()[-3000:]
        # closed (numeric status 2 in the encoded answer): the closed-ticket policy applies
        sim.post(f"/_sim/tickets/superoffice-soap/{t['id']}/close", {})
        send(
            daemon.smtp_port,
            mail(f"Re: {ack[0]['subject']}", to="support@example.com", body="again"),
        )
        assert wait_for(lambda: len(tickets(sim, "superoffice-soap")) == 2, timeout=60), (
            daemon.log.read_text()[-3000:]
        )
        first, second = tickets(sim, "superoffice-soap")
        assert len(first["messages"]) == 2 and first["status"] == "closed"
        assert second["messages"][0]["body"].rstrip().endswith("again")
        calls = sim.get("/_sim/calls")
        assert calls["superoffice-soap"] > 0
    finally:
        daemon.stop()
