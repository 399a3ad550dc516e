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

    return spool.read_sync(q)


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
    attempts = spool.read_sync(lambda c: [r[0] for r in c.execute("SELECT attempts FROM outbox")])
    assert attempts == [1, 1, 1, 1]  # the dropped connection cost no failed attempt


async def test_acknowledgement_waits_while_relay_is_down_then_goes(spool: SqliteSpool) -> None:
    port = free_port()  # nothing listens yet
    await queue_acks(spool, 2)
    sender = AckSender(spool, "127.0.0.1", port, parallel=2)
    task = asyncio.create_task(sender.run())
    try:
        async with asyncio.timeout(20):
            while True:
                rows = spool.read_sync(
                    lambda c: c.execute("SELECT attempts, last_error FROM outbox").fetchall()
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
