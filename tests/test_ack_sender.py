"""The outbox sender against a real aiosmtpd relay on loopback and the real SQLite spool: messages
share relay connections, a connection the relay dropped while idle is replaced without losing or
failing a message, and acknowledgements wait in the outbox while the relay is down."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP

from gateway.ack import AckSender
from gateway.models import Envelope
from gateway.spool.base import AckDraft, Outcome, State
from gateway.spool.sqlite import SqliteSpool
from tests.spool_sql import sqlite_read


class Relay:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.sessions = 0
        self.protocols: list[SMTP] = []

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), envelope.content))
        return "250 2.0.0 Ok"


class CountingController(Controller):
    def __init__(self, relay: Relay, port: int) -> None:
        super().__init__(relay, hostname="127.0.0.1", port=port)
        self.relay = relay

    def factory(self) -> SMTP:
        proto = super().factory()
        self.relay.sessions += 1
        self.relay.protocols.append(proto)
        return proto


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    sp = SqliteSpool(tmp_path / "spool.sqlite")
    yield sp
    await sp.close()


async def queue_acks(spool: SqliteSpool, n: int) -> None:
    for i in range(n):
        env = Envelope(mail_from=f"c{i}@example.org", rcpt_tos=("support@example.com",))
        put = await spool.put(b"Subject: x\r\n\r\nbody\r\n", env)
        data = f"To: c{i}@example.org\r\nSubject: [Ticket #{i}]\r\n\r\nthanks\r\n".encode()
        await spool.finish(
            put.id,
            Outcome(state=State.DONE, ack=AckDraft(f"c{i}@example.org", "", data, f"<ack{i}@gw>")),
        )


def outbox_states(spool: SqliteSpool) -> dict[str, int]:
    def q(conn: Any) -> dict[str, int]:
        return {r[0]: r[1] for r in conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY 1")}

    return sqlite_read(spool, q)


async def run_until(sender: AckSender, cond: Any, timeout: float = 20.0) -> None:
    task = asyncio.create_task(sender.run())
    try:
        async with asyncio.timeout(timeout):
            while not cond():
                sender.wake.set()
                await asyncio.sleep(0.05)
    finally:
        sender.stop()
        await asyncio.wait_for(task, 10)


async def test_acknowledgements_share_relay_connections(spool: SqliteSpool) -> None:
    relay = Relay()
    port = free_port()
    ctl = CountingController(relay, port)
    ctl.start()
    relay.sessions = 0  # the controller's own start-up probe
    try:
        await queue_acks(spool, 40)
        sender = AckSender(spool, "127.0.0.1", port, parallel=4)
        await run_until(sender, lambda: len(relay.messages) >= 40)
    finally:
        ctl.stop()
    assert sorted(int(m[2].split(b"#")[1].split(b"]")[0]) for m in relay.messages) == list(
        range(40)
    )
    assert {m[0] for m in relay.messages} == {"<>"}, relay.messages[0]  # null sender
    assert relay.sessions <= 4  # not one connection per message
    assert outbox_states(spool) == {"sent": 40}


async def test_connection_dropped_by_relay_while_idle_is_replaced(spool: SqliteSpool) -> None:
    relay = Relay()
    port = free_port()
    ctl = CountingController(relay, port)
    ctl.start()
    relay.sessions, relay.protocols = 0, []
    try:
        sender = AckSender(spool, "127.0.0.1", port, parallel=1)
        task = asyncio.create_task(sender.run())
        await queue_acks(spool, 1)
        async with asyncio.timeout(20):
            while len(relay.messages) < 1:
                sender.wake.set()
                await asyncio.sleep(0.05)
        # the relay hangs up on the idle connection (as relays do after their timeout)
        for proto in relay.protocols:
            if proto.transport is not None:  # on the relay's own loop (its thread)
                ctl.loop.call_soon_threadsafe(proto.transport.close)
        await asyncio.sleep(0.2)
        await queue_acks(spool, 3)
        async with asyncio.timeout(20):
            while len(relay.messages) < 4:
                sender.wake.set()
                await asyncio.sleep(0.05)
        sender.stop()
        await asyncio.wait_for(task, 10)
    finally:
        ctl.stop()
    assert relay.sessions == 2
    assert outbox_states(spool) == {"sent": 4}
    attempts = sqlite_read(
        spool, lambda c: [r[0] for r in c.execute("SELECT attempts FROM outbox")]
    )
    assert attempts == [1, 1, 1, 1]  # the dropped connection cost no failed attempt


async def test_acknowledgement_waits_while_relay_is_down_then_goes(spool: SqliteSpool) -> None:
    port = free_port()  # nothing listens yet
    await queue_acks(spool, 2)
    sender = AckSender(spool, "127.0.0.1", port, parallel=2)
    task = asyncio.create_task(sender.run())
    try:
        async with asyncio.timeout(20):
            while True:
                rows = sqlite_read(
                    spool, lambda c: c.execute("SELECT attempts, last_error FROM outbox").fetchall()
                )
                if all(r[0] >= 1 for r in rows):
                    break
                await asyncio.sleep(0.05)
        assert outbox_states(spool) == {"pending": 2}
        assert all("relay unreachable" in r[1] for r in rows)
        relay = Relay()
        ctl = CountingController(relay, port)
        ctl.start()
        try:
            # the retry is due after its backoff (2 s +-20 %)
            async with asyncio.timeout(20):
                while len(relay.messages) < 2:
                    sender.wake.set()
                    await asyncio.sleep(0.1)
        finally:
            ctl.stop()
    finally:
        sender.stop()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 10)
    assert outbox_states(spool) == {"sent": 2}


async def _queue_built(spool: SqliteSpool, rcpt: str, subject: str) -> None:
    from gateway.ack import Template, build_ack
    from gateway.models import ParsedMail

    env = Envelope(mail_from=rcpt, rcpt_tos=("support@example.com",))
    put = await spool.put(b"Subject: x\r\n\r\nbody\r\n", env)
    data, msg_id = build_ack(
        Template("t", "Subject: {token} Re: {subject_full}\n\nThanks, {sender_name}.\n"),
        ParsedMail(subject=subject, from_addr=rcpt, message_id="orig@example.org"),
        rcpt=rcpt,
        ref="42",
        token="[Ticket #42]",
        from_address="support@example.com",
        from_name="Support",
        hostname="gw.test",
        backend="b",
    )
    ack = AckDraft(rcpt=rcpt, mail_from="", data=data, message_id=f"<{msg_id}>")
    await spool.finish(put.id, Outcome(state=State.DONE, ack=ack))


async def test_subject_of_5000_characters_without_spaces_is_accepted_by_the_relay(
    spool: SqliteSpool,
) -> None:
    import email
    import email.policy

    subject = "x" * 5000
    await _queue_built(spool, "c@example.org", subject)
    relay = Relay()
    ctl = CountingController(relay, free_port())  # aiosmtpd: lines over 1000 octets are refused
    ctl.start()
    try:
        sender = AckSender(spool, "127.0.0.1", ctl.port, parallel=1)
        await run_until(sender, lambda: len(relay.messages) == 1)
    finally:
        ctl.stop()
    assert outbox_states(spool) == {"sent": 1}
    data = relay.messages[0][2]
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert msg["Subject"] == f"[Ticket #42] Re: {subject}"


class Utf8Controller(CountingController):
    def __init__(self, relay: Relay, port: int, *, utf8: bool) -> None:
        Controller.__init__(self, relay, hostname="127.0.0.1", port=port, enable_SMTPUTF8=utf8)
        self.relay = relay


@pytest.mark.parametrize("offers", [True, False])
async def test_utf8_address_goes_over_smtputf8_or_fails_once_for_good(
    spool: SqliteSpool, offers: bool
) -> None:
    from gateway.status import StatusBoard

    await _queue_built(spool, "jürgen@exämple.org", "Grüße")
    relay = Relay()
    ctl = Utf8Controller(relay, free_port(), utf8=offers)
    ctl.start()
    board = StatusBoard()
    outbox = board.register("outbox", "outbox")
    try:
        sender = AckSender(spool, "127.0.0.1", ctl.port, parallel=1, status=outbox)
        await run_until(sender, lambda: outbox_states(spool) != {"pending": 1})
    finally:
        ctl.stop()
    rows = sqlite_read(
        spool, lambda c: c.execute("SELECT attempts, last_error FROM outbox").fetchall()
    )
    if offers:
        assert outbox_states(spool) == {"sent": 1}
        assert relay.messages[0][1] == ["jürgen@exämple.org"]
        assert "jürgen@exämple.org".encode() in relay.messages[0][2]
    else:
        assert outbox_states(spool) == {"failed": 1}, rows
        assert relay.messages == []
        assert "SMTPUTF8" in rows[0][1]
        assert sender.failed == 1
    assert outbox.ok  # one acknowledgement's failure is not an outage of the outbox
