"""SIGTERM right after a 3,000-mail burst (real processes): the daemon exits within
`drain_timeout` + 5 s, and every accepted mail is either done or back in the queue (none lost,
none left `processing`); a restart tickets the rest."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from pathlib import Path

import aiosmtplib

from tests.harness import DaemonProcess, SimProcess, wait_for, write_config

BURST = 3000
DRAIN_TIMEOUT = 20.0
RCPTS = ["support@example.com", "sales@example.com", "hosting@example.com", "billing@example.com"]


async def _burst(port: int, n: int, tag: str, concurrency: int = 16) -> int:
    """Send `n` mails over `concurrency` sessions; return how many got 250."""
    accepted = 0
    counter = iter(range(n))

    async def session() -> None:
        nonlocal accepted
        client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60)
        await client.connect()
        try:
            for i in counter:
                msg = (
                    f"From: c{i}@example.org\r\nTo: {RCPTS[i % 4]}\r\n"
                    f"Subject: {tag} {i}\r\nMessage-ID: <{tag}-{i}@example.org>\r\n\r\nbody\r\n"
                )
                _, reply = await client.sendmail(f"c{i}@example.org", [RCPTS[i % 4]], msg)
                if reply.startswith("2") or "queued" in reply.lower():
                    accepted += 1
        finally:
            await client.quit()

    await asyncio.gather(*(session() for _ in range(concurrency)))
    return accepted


def _states(daemon: DaemonProcess, cfg: Path) -> dict[str, int]:
    """Messages per state, read from the spool file (`queue ls` shows a page, not all)."""
    path = cfg.parent / "var" / "gateway.sqlite"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    try:
        return dict(conn.execute("SELECT state, COUNT(*) FROM messages GROUP BY state").fetchall())
    finally:
        conn.close()


def test_sigterm_right_after_a_3000_mail_burst(tmp_path: Path) -> None:
    sim = SimProcess(tmp_path / "sim")
    sim.start()
    daemon: DaemonProcess | None = None
    try:
        cfg = write_config(
            tmp_path / "gw",
            sim_http=sim.http_port,
            sim_smtp=sim.smtp_port,
            replace={
                "drain_timeout = 20.0": f"drain_timeout = {DRAIN_TIMEOUT}",
                # what is asserted is the stop and the tickets: two worker processes and no
                # acknowledgements make the 3,000 tickets after the restart come sooner
                "worker_processes = 1 ": "worker_processes = 2 ",
                "enabled = true                     # send acknowledgements": "enabled = false",
            },
        )
        daemon = DaemonProcess(cfg)
        daemon.start(timeout=120)  # the machine may be busy: the worker's start is slow
        tag = "stop-burst"
        accepted = asyncio.run(_burst(daemon.smtp_port, BURST, tag))
        assert accepted == BURST
        assert daemon.proc is not None
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        rc = daemon.proc.wait(DRAIN_TIMEOUT + 30)
        took = time.monotonic() - started
        assert rc == 0, daemon.log.read_text()[-3000:]
        assert took <= DRAIN_TIMEOUT + 5, f"stopped after {took:.1f} s"
        states = _states(daemon, cfg)
        assert sum(states.values()) == BURST, states  # none lost
        assert states.get("processing", 0) == 0, states  # in flight: finished or requeued
        assert states.get("dead", 0) == 0, states
        print(f"stopped in {took:.1f} s; states {states}")
        # a restart tickets what was left
        daemon.start(timeout=120)

        def all_done() -> bool:
            return _states(daemon, cfg).get("done", 0) == BURST  # type: ignore[union-attr]

        assert wait_for(all_done, timeout=400, interval=3), _states(daemon, cfg)
        titles = [t["title"] for t in sim.get("/_sim/tickets") if t["title"].startswith(tag)]
        assert len(titles) == BURST and len(set(titles)) == BURST  # once each
    finally:
        if daemon is not None:
            daemon.stop()
        sim.stop()
