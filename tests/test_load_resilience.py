"""1,000 concurrent SMTP connections from several loopback addresses and a slow-drip client leave
the daemon responsive: /healthz answers, and a mail from another address is accepted and ticketed."""

from __future__ import annotations

import asyncio
import resource
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
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:  # the test's own 1,000 client sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    sim = SimProcess(tmp_path)
    sim.start()
    cfg = write_config(
        tmp_path / "gw",
        sim_http=sim.http_port,
        sim_smtp=sim.smtp_port,
        replace={"max_connections_per_ip = 64": "max_connections_per_ip = 200"},
    )
    daemon = DaemonProcess(cfg)
    daemon.start()
    yield sim, daemon
    daemon.stop()
    sim.stop()


async def _hold(port: int, src: str, n: int, holders: list[asyncio.StreamWriter]) -> int:
    greeted = 0
    for _ in range(n):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
        line = await asyncio.wait_for(reader.readline(), 30)
        if line.startswith(b"220"):
            greeted += 1
        holders.append(writer)
    return greeted


async def _slow_drip(port: int, stop: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.10", 0))
    await reader.readline()
    for chunk in (
        b"EHLO drip\r\n",
        b"MAIL FROM:<drip@example.org>\r\n",
        b"RCPT TO:<support@example.com>\r\n",
        b"DATA\r\n",
    ):
        writer.write(chunk)
        await writer.drain()
        await asyncio.sleep(0.05)
    while not stop.is_set():  # one byte every 100 ms, never finishing
        writer.write(b"x")
        await writer.drain()
        await asyncio.sleep(0.1)
    writer.close()


async def test_thousand_connections_and_a_slow_drip_leave_the_daemon_responsive(
    stack: tuple[SimProcess, DaemonProcess],
) -> None:
    sim, daemon = stack
    holders: list[asyncio.StreamWriter] = []
    stop = asyncio.Event()
    drip = asyncio.create_task(_slow_drip(daemon.smtp_port, stop))
    greeted = await asyncio.gather(
        *(_hold(daemon.smtp_port, f"127.0.0.{i}", 125, holders) for i in range(2, 10))
    )
    assert sum(greeted) == 1000
    async with httpx.AsyncClient() as client:
        r = await client.get(f"http://127.0.0.1:{daemon.health_port}/healthz", timeout=1.0)
        assert r.status_code == 200
    subject = f"while under load {uuid.uuid4().hex[:6]}"

    def send() -> None:
        msg = EmailMessage()
        msg["From"] = "calm@example.org"
        msg["To"] = "support@example.com"
        msg["Subject"] = subject
        msg.set_content("still there?")
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as s:
            s.send_message(msg)

    await asyncio.to_thread(send)
    found = await asyncio.to_thread(
        wait_for, lambda: [t for t in sim.get("/_sim/tickets") if t["title"] == subject], 30
    )
    assert found
    stop.set()
    await drip
    for w in holders:
        w.close()
