"""Test harness: free ports, a config written from config.example.toml, the daemon as a process.

The daemon and the simulators run as real `gateway run` / `gateway simulate` subprocesses, as users
run them, so tests can wait synchronously without starving either server.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    directory: Path,
    *,
    sim_http: int,
    sim_smtp: int,
    smtp_port: int | None = None,
    health_port: int | None = None,
    extra: str = "",
    replace: dict[str, str] | None = None,
) -> Path:
    """Copy config.example.toml and rules/ into `directory`, pointing at the given ports."""
    text = (ROOT / "config.example.toml").read_text()
    smtp_port = smtp_port or free_port()
    health_port = health_port or free_port()
    text = text.replace("127.0.0.1:8900", f"127.0.0.1:{sim_http}")
    text = text.replace('relay = "127.0.0.1:2526"', f'relay = "127.0.0.1:{sim_smtp}"')
    text = text.replace('listen = "127.0.0.1:2525"', f'listen = "127.0.0.1:{smtp_port}"')
    text = text.replace('listen = "127.0.0.1:8025"', f'listen = "127.0.0.1:{health_port}"')
    # tests must not wait minutes for a retry
    text = re.sub(r"^base = 10.0", "base = 0.2", text, flags=re.M)
    text = re.sub(r"^max_delay = 3600.0", "max_delay = 1.0", text, flags=re.M)
    text = re.sub(r"^paused_check = 60.0", "paused_check = 1.0", text, flags=re.M)
    for old, new in (replace or {}).items():
        assert old in text, old
        text = text.replace(old, new)
    text += "\n" + extra
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.toml"
    path.write_text(text)
    if (directory / "rules").exists():
        shutil.rmtree(directory / "rules")
    shutil.copytree(ROOT / "rules", directory / "rules")
    return path


def ports_of(config: Path) -> tuple[int, int]:
    text = config.read_text()
    smtp = int(re.search(r'^\[smtp\][^\[]*?listen = "127.0.0.1:(\d+)"', text, re.M | re.S).group(1))  # type: ignore[union-attr]
    health = int(
        re.search(r'^\[health\][^\[]*?listen = "127.0.0.1:(\d+)"', text, re.M | re.S).group(1)
    )  # type: ignore[union-attr]
    return smtp, health


class DaemonProcess:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.smtp_port, self.health_port = ports_of(config)
        self.log = config.parent / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:  # generous: a loaded CI machine
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "run", "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=self.config.parent,
                # its own session, as under a service manager: Linux gives a session its own
                # scheduling autogroup, so worker_nice weighs the worker against its own intake,
                # not against every busy process of the test run
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"daemon exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}"
                )
            try:
                r = httpx.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1)
                if r.status_code in (200, 503) and r.json().get("status") != "starting":
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.kill9()  # never leave a half-started daemon (and its worker) behind
        raise RuntimeError(f"daemon did not come up:\n{self.log.read_text()[-3000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill9(self) -> None:
        """SIGKILL the daemon and its worker process at once, as a crash or OOM kill would."""
        assert self.proc is not None
        children = child_pids(self.proc.pid)
        self.proc.kill()
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(10)

    def gateway(self, *args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args],
            input=input,
            capture_output=True,
            timeout=60,
            cwd=self.config.parent,
        )


def child_pids(parent: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == parent:
            out.append(int(entry.name))
    return out


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    return last


class SimProcess:
    def __init__(self, directory: Path) -> None:
        self.http_port = free_port()
        self.smtp_port = free_port()
        self.log = directory / "sim.log"
        directory.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> None:  # 60 s: a loaded machine (issue 16)
        """Start the simulators. A port that `free_port` found free can be taken by another test
        process before the simulator binds it: then it starts again on fresh ports (the tests
        read the ports after `start`)."""
        for attempt in range(3):
            with open(self.log, "ab") as log:
                logged = log.tell()
                self.proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "gateway",
                        "simulate",
                        "--listen",
                        f"127.0.0.1:{self.http_port}",
                        "--smtp",
                        f"127.0.0.1:{self.smtp_port}",
                    ],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            proc = self.proc
            wait_for(lambda p=proc: self._up() or p.poll() is not None, timeout=timeout)
            if self._up():
                return
            output = self.log.read_bytes()[logged:].decode(errors="replace")
            if proc.poll() is None or "address already in use" not in output or attempt == 2:
                self.stop()
                raise RuntimeError(f"simulators did not come up: {output[-2000:]}")
            self.http_port, self.smtp_port = free_port(), free_port()

    def _up(self) -> bool:
        try:
            return httpx.get(f"{self.url}/_sim/tickets", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str) -> list[dict]:  # type: ignore[type-arg]
        r = httpx.get(f"{self.url}{path}", timeout=10)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def post(self, path: str, body: dict) -> dict:  # type: ignore[type-arg]
        r = httpx.post(f"{self.url}{path}", json=body, timeout=10)
        r.raise_for_status()
        return r.json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
