"""Shared helpers of the hand-run benchmarks (bench/ingest.py, bench/e2e.py); never run by CI.

- free loopback ports, a temporary config made from config.example.toml (own ports, own spool,
  rules/ and templates/ copied beside it), and the `gateway simulate` / `gateway run` subprocesses
  (started in their own process group, ready once /_sim/tickets resp. /healthz answer 200);
- a bare aiosmtpd sink that discards, run as its own process (`python bench/common.py sink
  --port N`) so that it does not share the load generator's GIL, just as the gateway does not;
- an 8 KiB mail generator and an SMTP load generator (aiosmtplib): N concurrent clients, one
  message per connection (connect, EHLO, MAIL, RCPT, DATA, QUIT), for a count or a duration;
- /proc helpers: CPU seconds and VmHWM/VmRSS summed over a process tree; an optional fsync
  counter (`perf stat` on the syscall tracepoints) for the spool's group-commit figure.

Everything binds and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

HOST = "127.0.0.1"
REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
MAIL_SIZE = 8 * 1024

# ---------------------------------------------------------------------------------- small utils


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def python_exe() -> str:
    exe = VENV_BIN / "python"
    return str(exe) if exe.exists() else sys.executable


def gateway_exe() -> str:
    exe = VENV_BIN / "gateway"
    if exe.exists():
        return str(exe)
    found = shutil.which("gateway")
    if found is None:
        raise SystemExit("bench: no `gateway` command (pip install -e . into .venv first)")
    return found


def compile_bytecode() -> None:
    """Byte-compile the gateway package (into its __pycache__ directories), as an installed
    daemon has it: scripts/install and pip compile at install time. A checkout installed with
    `pip install -e .` has no bytecode of its own modules, and where PYTHONDONTWRITEBYTECODE is
    set none is ever written, so every daemon and worker start would compile each module from
    source (~0.3 s of CPU per process here): that is not the daemon's start-up cost."""
    subprocess.run(
        [python_exe(), "-m", "compileall", "-q", str(REPO / "gateway")],
        check=True,
        stdout=subprocess.DEVNULL,
    )


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of `values`; nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(p / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


SCHEDULING = ("batch", "idle", "normal")  # [gateway] worker_scheduling


def scheduling_list(value: str) -> list[str]:
    """argparse type of `--worker-scheduling`: policies, comma-separated, to compare in one run."""
    names = value.split(",")
    bad = sorted(set(names) - set(SCHEDULING))
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose {', '.join(SCHEDULING)}")
    return names


def print_table(
    headers: Sequence[str], rows: Iterable[Sequence[object]], *, title: str = ""
) -> None:
    """A plain fixed-width table; numbers right-aligned, text left-aligned."""
    text_rows = [[_cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    if title:
        print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in text_rows:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
    sys.stdout.flush()


def _cell(v: object) -> str:
    if isinstance(v, float):
        if v != v:  # nan
            return "-"
        return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------- config


def dump_toml(data: dict[str, Any]) -> str:
    """Enough TOML for our config: scalars, lists of scalars, nested tables, arrays of tables."""
    out: list[str] = []
    _dump_table(data, (), out)
    return "\n".join(out).lstrip("\n") + "\n"


def _key(k: str) -> str:
    ok = k and all(c.isalnum() or c in "-_" for c in k)
    return k if ok else _value(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        esc = v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{esc}"'
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def _dump_table(data: dict[str, Any], path: tuple[str, ...], out: list[str]) -> None:
    tables: list[tuple[str, Any]] = []
    for k, v in data.items():
        if isinstance(v, dict) or (
            isinstance(v, list) and v and all(isinstance(x, dict) for x in v)
        ):
            tables.append((k, v))
        else:
            out.append(f"{_key(k)} = {_value(v)}")
    for k, v in tables:
        sub = (*path, k)
        name = ".".join(_key(p) for p in sub)
        if isinstance(v, dict):
            out.extend(("", f"[{name}]"))
            _dump_table(v, sub, out)
        else:
            for item in v:
                out.extend(("", f"[[{name}]]"))
                _dump_table(item, sub, out)


def merge(base: dict[str, Any], extra: dict[str, Any]) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v


@dataclass
class Ports:
    smtp: int
    health: int
    sim_http: int
    sim_smtp: int

    @classmethod
    def pick(cls, sim_http: int | None = None, sim_smtp: int | None = None) -> Ports:
        return cls(
            smtp=free_port(),
            health=free_port(),
            sim_http=sim_http or free_port(),
            sim_smtp=sim_smtp or free_port(),
        )


def write_config(
    directory: Path,
    ports: Ports,
    overrides: dict[str, Any] | None = None,
    *,
    host: str = HOST,
    spool_url: str = "",
) -> Path:
    """config.example.toml adjusted to `ports`, its own spool and rules/templates in `directory`.

    Returns the config path. `overrides` is merged key by key (e.g. {"backends": {"whmcs":
    {"concurrency": 8}}}). `host`: the loopback address the SMTP and health listeners bind
    (a node of a cluster drill: 127.0.0.2, ...); `spool_url`: a PostgreSQL spool instead of the
    SQLite file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    with (REPO / "config.example.toml").open("rb") as f:
        cfg: dict[str, Any] = tomllib.load(f)
    sim = f"http://{HOST}:{ports.sim_http}"
    cfg.setdefault("smtp", {})["listen"] = f"{host}:{ports.smtp}"
    cfg.setdefault("health", {})["listen"] = f"{host}:{ports.health}"
    if spool_url:
        cfg.setdefault("spool", {}).pop("path", None)
        cfg["spool"]["url"] = spool_url
    else:
        cfg.setdefault("spool", {})["path"] = "var/gateway.sqlite"
    cfg.setdefault("rules", {})["dir"] = "rules"
    cfg.setdefault("ack", {})["relay"] = f"{HOST}:{ports.sim_smtp}"
    cfg["ack"]["templates_dir"] = "templates"
    # a bench sends far more mail from one domain, and in all, than a real hour brings: every
    # mail of a bench is acknowledged, as in the figures of the versions before these limits
    cfg["ack"]["domain_rate_limit"] = 0
    cfg["ack"]["global_rate_limit"] = 0
    for b in cfg.get("backends", {}).values():
        url = str(b.get("url", ""))
        if url.startswith("http://127.0.0.1:8900"):
            b["url"] = sim + url[len("http://127.0.0.1:8900") :]
    merge(cfg, overrides or {})
    rules_dir = directory / "rules"
    if rules_dir.exists():
        shutil.rmtree(rules_dir)
    shutil.copytree(REPO / "rules", rules_dir)  # the quick start's rules and templates
    tmpl = directory / "templates"
    if tmpl.exists():
        shutil.rmtree(tmpl)
    shutil.copytree(REPO / "templates", tmpl)
    path = directory / "config.toml"
    path.write_text(dump_toml(cfg), encoding="utf-8")
    path.chmod(0o600)
    return path


# ---------------------------------------------------------------------------------- processes


class Proc:
    """A subprocess we started, in its own process group, with its output in a log file."""

    def __init__(
        self, name: str, argv: Sequence[str], log_path: Path, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def errors(self, limit: int = 3) -> list[str]:
        """The first `limit` distinct error lines of its log (level=error, tracebacks)."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return []
        found: list[str] = []
        for line in text.splitlines():
            if "level=error" in line or line.startswith("Traceback"):
                short = line.split("logger=", 1)[-1][:200]
                if short not in found:
                    found.append(short)
            if len(found) >= limit:
                break
        return found

    def stop(self, timeout: float = 25.0) -> int | None:
        """SIGTERM, wait, then SIGKILL; afterwards kill what is left of its own process group."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.popen.kill()
                self.popen.wait(5)
        # helpers it forked (parse pool, forkserver) are in the group whose id is our pid
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self._log.close()
        return self.popen.returncode


def _wait_http(proc: Proc, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode} before {url} answered;"
                f" log {proc.log_path}:\n{proc.tail()}"
            )
        try:
            r = httpx.get(url, timeout=2.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.1)
    raise RuntimeError(
        f"{proc.name}: {url} not 200 within {timeout:.0f}s ({last}); log {proc.log_path}"
    )


def _wait_tcp(proc: Proc, port: int, timeout: float, host: str = HOST) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited early; log {proc.log_path}:\n{proc.tail()}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1.0) as s:
            s.recv(128)  # the SMTP banner
            return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: port {port} not answering within {timeout:.0f}s")


def start_simulator(workdir: Path, ports: Ports, timeout: float = 30.0) -> Proc:
    proc = Proc(
        "gateway simulate",
        [
            gateway_exe(),
            "simulate",
            "--listen",
            f"{HOST}:{ports.sim_http}",
            "--smtp",
            f"{HOST}:{ports.sim_smtp}",
        ],
        workdir / "simulate.log",
        cwd=workdir,
    )
    try:
        _wait_http(proc, f"http://{HOST}:{ports.sim_http}/_sim/tickets", timeout)
    except Exception:
        proc.stop()
        raise
    return proc


def start_gateway(config: Path, ports: Ports, timeout: float = 60.0, host: str = HOST) -> Proc:
    proc = Proc(
        "gateway run",
        [gateway_exe(), "run", "-c", str(config)],
        config.parent / "gateway.log",
        cwd=config.parent,
    )
    try:
        _wait_http(proc, f"http://{host}:{ports.health}/healthz", timeout)
        _wait_tcp(proc, ports.smtp, timeout, host)
    except Exception:
        proc.stop()
        raise
    return proc


def start_sink(workdir: Path, port: int, timeout: float = 15.0) -> Proc:
    proc = Proc(
        "bare aiosmtpd sink",
        [python_exe(), str(Path(__file__).resolve()), "sink", "--port", str(port)],
        workdir / f"sink-{port}.log",
        cwd=workdir,
    )
    try:
        _wait_tcp(proc, port, timeout)
    except Exception:
        proc.stop()
        raise
    return proc


# ---------------------------------------------------------------------------------- /proc


def tree_pids(root: int) -> list[int]:
    """`root` and all its descendants (by the parent pid in /proc/PID/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read_stat(int(entry))
        if stat is not None:
            children.setdefault(int(stat[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...]; None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds of the living processes of the tree (threads included)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in tree_pids(root):
        st = _read_stat(pid)
        if st is not None and st[0] != "Z":
            total += int(st[11]) + int(st[12])  # utime, stime
    return total / tick


def tree_memory_kib(root: int) -> tuple[int, int]:
    """(sum of VmHWM, sum of VmRSS) over the process tree, KiB. The sum of per-process peaks is
    an upper bound of the tree's peak."""
    hwm = rss = 0
    for pid in tree_pids(root):
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("VmHWM:"):
                hwm += int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss += int(line.split()[1])
    return hwm, rss


def own_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class FsyncCounter:
    """Counts fsync/fdatasync calls of one process (all its threads) with `perf stat`.

    Tracepoint counting costs next to nothing; when perf is missing or not permitted, `stop()`
    returns None and the caller says so.
    """

    EVENTS = ("syscalls:sys_enter_fsync", "syscalls:sys_enter_fdatasync")

    def __init__(self, pid: int, out: Path) -> None:
        self.out = out
        self.proc: subprocess.Popen[bytes] | None = None
        perf = shutil.which("perf")
        if perf is None:
            return
        self.proc = subprocess.Popen(
            [perf, "stat", "-x", ",", "-e", ",".join(self.EVENTS), "-p", str(pid), "-o", str(out)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)  # let perf attach before the load starts
        if self.proc.poll() is not None:
            self.proc = None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        total, seen = 0, False
        try:
            lines = self.out.read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            parts = line.split(",")
            if len(parts) > 2 and parts[2] in self.EVENTS and parts[0].strip().isdigit():
                total += int(parts[0])
                seen = True
        return total if seen else None


# ---------------------------------------------------------------------------------- mail


def make_mail(
    mail_from: str,
    rcpt: str,
    subject: str,
    *,
    size: int = MAIL_SIZE,
    hostname: str = "bench.example.org",
) -> bytes:
    """A plain-text mail of exactly `size` bytes (CRLF line ends) with a unique Message-ID."""
    head = (
        f"From: Bench Customer <{mail_from}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: {subject}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@{hostname}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
        "Hello support,\r\n\r\n"
    ).encode()
    line = b"The quick brown fox jumps over the lazy dog; please open a ticket for this.\r\n"
    body = bytearray(head)
    while len(body) + len(line) <= size - 2:
        body += line
    pad = size - 2 - len(body)
    if pad > 0:
        body += b"x" * pad
    body += b"\r\n"
    return bytes(body[:size]) if len(body) > size else bytes(body)


# ---------------------------------------------------------------------------------- SMTP load


@dataclass
class LoadResult:
    clients: int
    accepted: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    elapsed: float = 0.0
    cpu: float = 0.0  # CPU seconds of this (the generator's) process during the run

    @property
    def rate(self) -> float:
        return self.accepted / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def error_text(self) -> str:
        return ", ".join(f"{k} x{v}" for k, v in self.errors.most_common(3)) or "0"


async def send_one(
    port: int, mail_from: str, rcpt: str, data: bytes, *, io_timeout: float = 60.0
) -> float:
    """One SMTP session with one message: connect, EHLO, MAIL, RCPT, DATA, QUIT.

    Returns time.monotonic() at the 250 for DATA. Raises on any refusal or error.
    """
    import aiosmtplib

    client = aiosmtplib.SMTP(
        hostname=HOST,
        port=port,
        local_hostname="bench.example.org",
        timeout=io_timeout,
        use_tls=False,
        start_tls=False,
    )
    await client.connect()
    try:
        await client.ehlo()
        await client.sendmail(mail_from, [rcpt], data)
        accepted_at = time.monotonic()
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await client.quit()
        return accepted_at
    finally:
        client.close()


MailFactory = Callable[[int], tuple[str, str, bytes]]  # index -> (mail_from, rcpt, data)


async def run_load(
    port: int,
    *,
    clients: int,
    mail_for: MailFactory,
    count: int | None = None,
    duration: float | None = None,
    on_accepted: Callable[[int, float], None] | None = None,
) -> LoadResult:
    """`clients` concurrent SMTP clients, one message per connection, until `count` messages have
    been attempted or `duration` seconds have passed. Errors are counted, never retried."""
    if count is None and duration is None:
        raise ValueError("give count or duration")
    result = LoadResult(clients=clients)
    next_index = 0
    deadline = None

    async def client_loop() -> None:
        nonlocal next_index
        while True:
            if count is not None and next_index >= count:
                return
            if deadline is not None and time.monotonic() >= deadline:
                return
            i = next_index
            next_index += 1
            mail_from, rcpt, data = mail_for(i)
            try:
                t = await send_one(port, mail_from, rcpt, data)
            except Exception as exc:
                result.errors[_error_name(exc)] += 1
                await asyncio.sleep(0.01)  # do not spin on a refusing server
                continue
            result.accepted += 1
            if on_accepted is not None:
                on_accepted(i, t)

    cpu0 = own_cpu_seconds()
    t0 = time.monotonic()
    if duration is not None:
        deadline = t0 + duration
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    result.elapsed = time.monotonic() - t0
    result.cpu = own_cpu_seconds() - cpu0
    return result


def _error_name(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    return f"{type(exc).__name__}({code})" if code else type(exc).__name__


# ---------------------------------------------------------------------------------- simulator API


class SimClient:
    """The simulators' inspection API (`/_sim/...`)."""

    def __init__(self, port: int) -> None:
        self.base = f"http://{HOST}:{port}"
        self.http = httpx.AsyncClient(base_url=self.base, timeout=60.0)

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _post(self, path: str, body: dict[str, Any]) -> Any:
        r = await self.http.post(path, json=body)
        r.raise_for_status()
        return r.json()

    async def reset(self) -> None:
        await self._post("/_sim/reset", {})

    async def fault(self, system: str, mode: str, **extra: Any) -> None:
        await self._post("/_sim/fault", {"system": system, "mode": mode, **extra})

    async def add_client(self, system: str, email: str, client_id: str, name: str) -> None:
        await self._post(
            "/_sim/clients", {"system": system, "email": email, "id": client_id, "name": name}
        )

    async def calls(self) -> dict[str, int]:
        r = await self.http.get("/_sim/calls")
        r.raise_for_status()
        return {str(k): int(v) for k, v in r.json().items()}

    async def tickets(self, system: str | None = None) -> list[dict[str, Any]]:
        r = await self.http.get("/_sim/tickets", params={"system": system} if system else None)
        r.raise_for_status()
        data: list[dict[str, Any]] = r.json()
        return data

    async def outbox(self) -> list[dict[str, Any]]:
        r = await self.http.get("/_sim/outbox")
        r.raise_for_status()
        data: list[dict[str, Any]] = r.json()
        return data


async def gateway_counters(port: int, names: Sequence[str]) -> dict[str, float]:
    """Sums of Prometheus counters (`gateway_<name>_total`) from the daemon's /metrics."""
    async with httpx.AsyncClient(timeout=10.0) as http:
        r = await http.get(f"http://{HOST}:{port}/metrics")
        r.raise_for_status()
    sums = dict.fromkeys(names, 0.0)
    for line in r.text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        base = metric.split("{", 1)[0]
        for n in names:
            if base == f"gateway_{n}_total":
                with contextlib.suppress(ValueError):
                    sums[n] += float(value)
    return sums


async def wait_until(
    check: Callable[[], Awaitable[bool]], within: float, interval: float = 0.25
) -> bool:
    deadline = time.monotonic() + within
    while True:
        if await check():
            return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)


# ---------------------------------------------------------------------------------- the bare sink


async def _serve_sink(port: int) -> None:
    from aiosmtpd.smtp import SMTP, Envelope, Session

    class Discard:
        async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
            return "250 2.0.0 Ok: discarded"

    loop = asyncio.get_running_loop()
    handler = Discard()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="bench-sink", decode_data=False, enable_SMTPUTF8=True),
        HOST,
        port,
        backlog=1024,
        reuse_address=True,
    )
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"sink listening on {HOST}:{port}", flush=True)
    await stop.wait()
    server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description="bench helpers: `sink --port N` runs a bare discarding SMTP sink"
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("sink")
    sp.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    if args.cmd == "sink":
        asyncio.run(_serve_sink(args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
