"""`gateway spool copy --to postgresql://...`: a SQLite spool with queued, deferred, done and dead
mails, maps and an outbox moves into an empty PostgreSQL spool (exit 0), a second copy into the
same database is refused (exit 1), and a node on PostgreSQL then tickets what was queued and
threads a follow-up to a ticket made before the move.
"""

from __future__ import annotations

import asyncio
import json
import smtplib
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.models import Envelope
from gateway.spool.base import AckDraft, Outcome, State
from gateway.spool.sqlite import SqliteSpool
from tests.harness import DaemonProcess, SimProcess, wait_for, write_config
from tests.pg_server import PostgresServer

ENV = Envelope(mail_from="old@example.org", rcpt_tos=("support@example.com",), peer="127.0.0.1")


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimProcess]:
    s = SimProcess(tmp_path / "sim")
    s.start(timeout=90)  # several daemons and a database share the machine
    yield s
    s.stop()


def mail(subject: str, msgid: str, extra: str = "") -> bytes:
    return (
        f"From: old@example.org\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: {msgid}\r\n{extra}\r\nbody of {subject}\r\n"
    ).encode()


async def fill(path: Path) -> dict[str, int]:
    s = SqliteSpool(path)
    ids: dict[str, int] = {}
    try:
        for name in ("done", "deferred", "dead", "queued"):
            ids[name] = (await s.put(mail(f"copy {name}", f"<{name}@example.org>"), ENV)).id
        await s.claim_due(3)
        await s.finish(
            ids["done"],
            Outcome(
                state=State.DONE,
                backend="superoffice-soap",
                rule="support",
                action="new",
                ticket_ref="7001",
                ticket_id="7001",
                system="superoffice-soap",
                requester="old@example.org",
                subject="copy done",
                message_id="done@example.org",
                ack=AckDraft("old@example.org", "", b"Subject: ack\r\n\r\nx\r\n", "<ack@gw>"),
            ),
        )
        await s.defer(ids["deferred"], error="busy", delay=3600)
        await s.finish(ids["dead"], Outcome(state=State.DEAD, reason="refused for good"))
    finally:
        await s.close()
    return ids


def test_copy_then_a_postgresql_node_carries_on(
    tmp_path: Path, sim: SimProcess, pg: PostgresServer
) -> None:
    cfg = write_config(tmp_path / "gw", sim_http=sim.http_port, sim_smtp=sim.smtp_port)
    spool = tmp_path / "gw" / "var" / "gateway.sqlite"
    ids = asyncio.run(fill(spool))
    url = pg.new_database()
    node = DaemonProcess(cfg)
    res = node.gateway("spool", "-c", str(cfg), "copy", "--to", url)
    assert res.returncode == 0, res.stderr
    assert b"4 messages" in res.stdout and b"1 tickets" in res.stdout and b"1 outbox" in res.stdout
    again = node.gateway("spool", "-c", str(cfg), "copy", "--to", url)
    assert again.returncode == 1 and b"refus" in again.stderr

    # the ticket made before the move exists in the ticket system
    sim.post(
        "/_sim/tickets",
        {
            "system": "superoffice-soap",
            "id": "7001",
            "title": "copy done",
            "requester": "old@example.org",
        },
    )
    text = cfg.read_text()
    text = text.replace('path = "var/gateway.sqlite"        #', '# path = "var/gateway.sqlite"  #')
    text = text.replace(
        '# url = "postgresql://gateway@db.example.com:5432/gateway"', f'url = "{url}"'
    )
    cfg.write_text(text)
    rows = {
        r["id"]: r for r in json.loads(node.gateway("queue", "-c", str(cfg), "ls", "--json").stdout)
    }
    assert [rows[ids[n]]["state"] for n in ("done", "deferred", "dead", "queued")] == [
        "done",
        "deferred",
        "dead",
        "queued",
    ]
    node.start(timeout=90)
    try:
        follow = EmailMessage()
        follow["From"] = "old@example.org"
        follow["To"] = "support@example.com"
        follow["Subject"] = "Re: copy done"
        follow["Message-ID"] = "<followup@example.org>"
        follow["In-Reply-To"] = "<done@example.org>"
        follow.set_content("a follow-up after the move")
        with smtplib.SMTP("127.0.0.1", node.smtp_port, timeout=30) as s:
            s.send_message(follow)

        def settled() -> list[dict] | None:  # type: ignore[type-arg]
            tickets = sim.get("/_sim/tickets")
            titles = [t["title"] for t in tickets]
            old = next(t for t in tickets if t["id"] == "7001")
            if "copy queued" in titles and any(
                "a follow-up after the move" in m["body"] for m in old["messages"]
            ):
                return tickets
            return None

        tickets = wait_for(settled, 90)
        assert tickets, sim.get("/_sim/tickets")
        titles = [t["title"] for t in tickets]
        assert titles.count("copy queued") == 1 and "Re: copy done" not in titles
        assert "copy deferred" not in titles  # still waiting for its retry time
        out = json.loads(node.gateway("queue", "-c", str(cfg), "ls", "--json").stdout)
        assert {r["id"] for r in out} >= set(ids.values())
        new_ids = [r["id"] for r in out if r["id"] not in ids.values()]
        assert new_ids and min(new_ids) > max(ids.values())  # ids go on after the copied ones
    finally:
        assert node.stop(60) == 0, node.log.read_text()[-3000:]
