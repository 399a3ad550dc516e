"""A hostile ticket-system endpoint cannot blow up the worker's memory (real processes).

Every backend URL points at a server that answers every call with an endless chunked body. With
all four backends at concurrency 8, the worker's peak resident memory stays under 300 MiB, the
mails wait (deferred), and none is lost.
"""

from __future__ import annotations

import json
import smtplib
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.harness import DaemonProcess, child_pids, free_port, wait_for, write_config

HOSTILE = textwrap.dedent(
    """
    import asyncio, sys

    CHUNK = b"%x\\r\\n%s\\r\\n" % (65536, b"<" * 65536)

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\\r\\n\\r\\n")
                length = 0
                for line in head.split(b"\\r\\n"):
                    k, _, v = line.partition(b":")
                    if k.strip().lower() == b"content-length":
                        length = int(v)
                if length:
                    await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Type: text/xml\\r\\n"
                             b"Transfer-Encoding: chunked\\r\\n\\r\\n")
                while True:
                    writer.write(CHUNK)
                    await writer.drain()
        except Exception:
            pass
        finally:
            writer.close()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
        async with server:
            await server.serve_forever()

    asyncio.run(main())
    """
)

RECIPIENTS = [
    "support@example.com",
    "sales@example.com",
    "hosting@example.com",
    "billing@example.com",
]


def _peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def test_endless_chunked_answers_on_all_four_backends(tmp_path: Path) -> None:
    port = free_port()
    hostile = subprocess.Popen(
        [sys.executable, "-c", HOSTILE, str(port)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    daemon: DaemonProcess | None = None
    try:
        cfg = write_config(tmp_path, sim_http=port, sim_smtp=free_port())
        # 32 mails in flight: every backend's 8 connections busy at once
        cfg.write_text(cfg.read_text().replace("workers = 16", "workers = 32"))
        daemon = DaemonProcess(cfg)
        daemon.start()
        assert daemon.proc is not None
        workers = wait_for(lambda: child_pids(daemon.proc.pid), timeout=20)  # type: ignore[union-attr]
        assert workers, "no worker process"
        with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as smtp:
            for i in range(40):
                rcpt = RECIPIENTS[i % 4]
                msg = (
                    f"From: c{i}@example.org\r\nTo: {rcpt}\r\nSubject: hostile {i}\r\n"
                    f"Message-ID: <hostile-{i}@example.org>\r\n\r\nbody {i}\r\n"
                )
                smtp.sendmail(f"c{i}@example.org", [rcpt], msg)

        errors: set[str] = set()

        def states() -> dict[str, int]:
            out = daemon.gateway("queue", "-c", str(cfg), "ls", "--json")  # type: ignore[union-attr]
            rows = json.loads(out.stdout or b"[]")
            errors.update(str(r.get("last_error") or "") for r in rows)
            counts: dict[str, int] = {}
            for row in rows:
                counts[row["state"]] = counts.get(row["state"], 0) + 1
            counts["tried"] = sum(1 for r in rows if r.get("last_error"))
            return counts

        # every mail tried at least once and waiting for another try
        deadline = time.monotonic() + 90
        seen: dict[str, int] = {}
        peak = 0
        while time.monotonic() < deadline:
            for pid in workers:
                try:
                    peak = max(peak, _peak_kib(pid))
                except OSError:
                    pass
            seen = states()
            if seen.get("tried", 0) == 40:
                break
            time.sleep(1)
        time.sleep(3)  # a few more rounds of retries against the endless answers
        for pid in workers:
            peak = max(peak, _peak_kib(pid))
        final = states()
        assert seen.get("tried", 0) == 40, seen  # every mail failed at least once, and waits
        waiting = sum(final.get(s, 0) for s in ("deferred", "processing", "queued"))
        assert waiting == 40, final  # none lost, none dead-lettered, none "done"
        assert peak < 300 * 1024, f"worker peak {peak // 1024} MiB"
        assert any("max_response_bytes" in e or "in flight" in e for e in errors), errors
        print(f"worker peak {peak // 1024} MiB; states {final}")
    finally:
        if daemon is not None:
            daemon.stop()
        hostile.kill()
        hostile.wait(5)
