"""IMAP backlog -> tickets: mails/s and CPU ms per mail, beside the django-helpdesk peer on the
same backlog in the same run, and the same mails over SMTP.

Run by hand (never by CI), from the repo root, as root (the private Dovecots need their mail
users; the peer's first run installs django-helpdesk 2.6.1 into /tmp/dhvenv with pip):

    .venv/bin/python bench/imap.py                  # 1,000 mails, one run, worker_processes = 2
    .venv/bin/python bench/imap.py --runs 3 --worker-processes 1
    .venv/bin/python bench/imap.py --no-peer --mails own   # our own mail mix, no peer

Per run:

0. Peer (unless --no-peer): django-helpdesk 2.6.1 `manage.py get_email` (SQLite, acknowledgements
   to Django's locmem outbox) drains the backlog from its own private Dovecot, run by
   ../shared/peers/bench_django_helpdesk.py exactly as ../shared/peers/bench_django_helpdesk.sh
   runs it (dovecot-up.sh on free ports, its own work directory under ours): its wall time and
   the CPU of the get_email process (/usr/bin/time), start-up included.
1. A private Dovecot (tests/imap_server.py: own config under /tmp, plain IMAP on a loopback port)
   gets the backlog of `--count` mails APPENDed to INBOX. `--mails peer` (the default): the
   peer's generator with the seed of its run 1, so both sides read the same bytes (2-11 KiB, 20 %
   with non-ASCII text, every 7th quoting an older mail, 2.5 % with an attachment, 250 senders
   in 17 domains). `--mails own`: 2-11 KiB each, a quarter of them multipart/mixed with an
   attachment (PDF, text or JPEG bytes, base64), a quarter multipart/alternative (text + HTML),
   the rest text/plain, every mail from its own sender, with Return-Path and Delivered-To as a
   delivery agent adds them. All to support@example.com (routed to superoffice-soap by the demo
   rules). The daemon acknowledges every ticket as the peer does (the ack rate limits are lifted
   for the bench: 250 senders would otherwise be capped at 5 acks each).
2. IMAP phase: `gateway simulate` and then `gateway run` with an [[imap]] section for that mailbox
   (security = "plain" to 127.0.0.1, after = "move", the other keys at their defaults). The clock
   starts just before the daemon process is spawned (its start-up is included) and stops when
   GET /_sim/tickets shows `--count` tickets that have their message (newTicket + addMessage
   done). A second figure starts at the first /healthz 200 instead.
3. SMTP phase: a fresh simulator and a fresh daemon (new spool); once it is ready, the same mails
   (without Return-Path/Delivered-To) are sent by 8 concurrent aiosmtplib clients, one message per
   connection; the clock runs from the first send to all tickets present.

CPU: user + system seconds of the daemon's whole process tree from /proc (the main process, its
worker and parse processes, whatever it forks; reaped children through cutime/cstime), from spawn
(IMAP) or from the first send (SMTP) to the end; the simulator's tree and Dovecot's tree
separately. The daemon's own start-up CPU (measured in the SMTP phase, at /healthz 200 before any
mail) is printed so that it can be told apart from the per-mail cost in the IMAP figure. The
gateway package is byte-compiled before the runs, as an installed daemon has it (scripts/install,
pip): an editable checkout under PYTHONDONTWRITEBYTECODE would compile every module from source
at every process start (`--no-compile` measures that case). The peer's packages are pip-installed,
hence compiled too.

Completion is watched cheaply: /_sim/calls (a few bytes) every 50 ms; the full /_sim/tickets list
(megabytes at 1,000 tickets) is fetched only once the simulator has seen at least two calls per
mail, and every 2 s regardless.

Targets (issue 13, with worker_processes = 2): >= 5x the peer's mails/s and <= 1/3 of its CPU per
mail, both measured in the same run (a figure of another day is no baseline: the peer measured
36 mails/s at 19.8 ms one day and 70 mails/s at 9.0 ms another on this kind of machine).
Everything here (daemon, simulator, Dovecot, the peer, this load generator) shares the machine's
cores (2 here); noise between runs is 10-30 %, so compare figures of the same run. Everything
binds and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent / "tests"))
import common  # noqa: E402
from imap_server import DovecotServer  # noqa: E402

RCPT = "support@example.com"
BACKEND = "superoffice-soap"  # where the demo rules send support@
TARGET_RATE = 5.0  # x the peer's mails/s
TARGET_CPU = 1 / 3  # x the peer's CPU ms per mail
PEERS = BENCH.parent.parent / "shared" / "peers"  # ../shared/peers beside the repo
PEER_SEED = 1001  # bench_django_helpdesk.py fills its run k with seed 1000 + k; we run k = 1
PEER_VENV = Path("/tmp/dhvenv")
PEER_VERSION = "2.6.1"
SMTP_CLIENTS = 8
HZ = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------------------------- the mails

SENTENCES = [
    "Our printer in the second floor office stops after every third page.",
    "Since the update on Monday the VPN client disconnects every few minutes.",
    "Could you please check why invoice 2024-0815 shows the wrong VAT rate?",
    "The web shop returns an error 500 when customers pay by credit card.",
    "Unser Drucker im Büro druckt seit gestern nur noch leere Seiten.",
    "I attached the log file and a screenshot of the error message.",
    "We need two more licences for the new colleagues starting next week.",
    "The backup job reported success but the archive on the NAS is empty.",
    "Please call me back at your earliest convenience, ideally before noon.",
    "Merci de vérifier la configuration de la boîte aux lettres partagée.",
]
NAMES = ["Jörg Müller", "Anna Svensson", "Li Wei", "María García", "Tom Baker", "Zoë Dupont"]
ATTACHMENTS = [
    ("scan-{n}.pdf", "application/pdf", b"%PDF-1.4\n"),
    ("server-{n}.log", "text/plain", b""),
    ("photo-{n}.jpg", "image/jpeg", b"\xff\xd8\xff\xe0\x00\x10JFIF"),
]


@dataclass
class BenchMail:
    sender: str
    raw: bytes  # as sent over SMTP
    has_attachment: bool
    delivery_headers: bool = True  # the mailbox copy gets Return-Path/Delivered-To

    def as_delivered(self) -> bytes:
        """The copy in the mailbox: what a delivery agent adds in front of it."""
        if not self.delivery_headers:
            return self.raw
        return (
            f"Return-Path: <{self.sender}>\r\nDelivered-To: {RCPT}\r\n".encode("ascii") + self.raw
        )


def _encoded_word(name: str) -> str:
    if name.isascii():
        return f'"{name}"'
    return "=?utf-8?b?" + base64.b64encode(name.encode()).decode("ascii") + "?="


def _text(rng: random.Random, size: int) -> bytes:
    """About `size` bytes (exactly, when size > 2) of UTF-8 prose with CRLF line ends."""
    out = bytearray()
    while True:
        line = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(1, 2)))
        enc = line.encode() + b"\r\n"
        if len(out) + len(enc) > size:
            break
        out += enc
    pad = size - len(out)
    if pad >= 2:
        out += b"." * (pad - 2) + b"\r\n"
    return bytes(out)


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data).replace(b"\n", b"\r\n")


def _build(i: int, tag: str, rng: random.Random, kind: str, text_size: int, att: bytes) -> bytes:
    name = NAMES[i % len(NAMES)]
    sender = f"customer{i}@bench-imap.example.org"
    head = (
        f"From: {_encoded_word(name)} <{sender}>\r\n"
        f"To: Support <{RCPT}>\r\n"
        f"Subject: Bench {tag} request {i}\r\n"
        f"Date: Mon, 10 Jun 2024 08:{i % 60:02d}:00 +0200\r\n"
        f"Message-ID: <bench-{tag}-{i}@bench-imap.example.org>\r\n"
        "MIME-Version: 1.0\r\n"
    ).encode()
    text = _text(rng, text_size)
    plain = b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    if kind == "plain":
        return head + plain + text
    if kind == "alternative":
        html = (
            b"<html><head><style>p{margin:0}</style></head><body><p>"
            + text[:1200].rsplit(b"\r\n", 1)[0].replace(b"\r\n", b"<br>\r\n")
            + b'</p><p><a href="https://status.example.org/">status page</a></p></body></html>\r\n'
        )
        return (
            head
            + b'Content-Type: multipart/alternative; boundary="alt-b"\r\n\r\n'
            + b"--alt-b\r\n"
            + plain
            + text
            + b"--alt-b\r\nContent-Type: text/html; charset=utf-8\r\n"
            + b"Content-Transfer-Encoding: 8bit\r\n\r\n"
            + html
            + b"--alt-b--\r\n"
        )
    fname, ctype, magic = ATTACHMENTS[i % len(ATTACHMENTS)]
    fname = fname.format(n=i)
    return (
        head
        + b'Content-Type: multipart/mixed; boundary="mix-b"\r\n\r\n'
        + b"--mix-b\r\n"
        + plain
        + text
        + b"--mix-b\r\n"
        + f'Content-Type: {ctype}; name="{fname}"\r\n'.encode()
        + f'Content-Disposition: attachment; filename="{fname}"\r\n'.encode()
        + b"Content-Transfer-Encoding: base64\r\n\r\n"
        + _b64(magic + att)
        + b"--mix-b--\r\n"
    )


def attachments(mails: list[BenchMail]) -> int:
    return sum(m.has_attachment for m in mails)


def make_mails(count: int, tag: str, seed: int = 7) -> list[BenchMail]:
    """`count` mails of 2-11 KiB (uniform), every 4th with an attachment, every 4th HTML."""
    rng = random.Random(seed)
    mails = []
    for i in range(count):
        target = rng.randint(2 * 1024, 11 * 1024)
        kind = ("plain", "alternative", "plain", "attachment")[i % 4]
        att = b""
        if kind == "attachment":
            # 30-60 % of the mail is the (base64) attachment
            att = rng.randbytes(int(target * rng.uniform(0.3, 0.6) * 3 / 4))
        text_size = 600
        raw = _build(i, tag, random.Random(i), kind, text_size, att)
        for _ in range(3):  # the text part absorbs the rest (the HTML part follows it)
            text_size = max(64, text_size + target - len(raw))
            raw = _build(i, tag, random.Random(i), kind, text_size, att)
        mails.append(BenchMail(f"customer{i}@bench-imap.example.org", raw, kind == "attachment"))
    return mails


def _peer_module(peers: Path) -> Any:
    spec = importlib.util.spec_from_file_location("bench_django_helpdesk", peers / PEER_SCRIPT)
    if spec is None or spec.loader is None:
        raise SystemExit(f"bench: cannot load {peers / PEER_SCRIPT}")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


PEER_SCRIPT = "bench_django_helpdesk.py"


def peer_mails(peers: Path, count: int) -> list[BenchMail]:
    """The peer's backlog of its run 1, byte for byte (its generator, its seed)."""
    mod = _peer_module(peers)
    rng = random.Random(PEER_SEED)
    mails = []
    for i in range(1, count + 1):
        raw: bytes = mod.make_mail(i, rng, PEER_SEED)
        found = re.search(rb"^From:.*<([^>]+)>", raw, re.M)
        sender = found.group(1).decode() if found else "customer@example.org"
        has_att = b"Content-Disposition: attachment" in raw
        mails.append(BenchMail(sender, raw, has_att, delivery_headers=False))
    return mails


# ---------------------------------------------------------------------------------- the peer


@dataclass
class PeerRun:
    mails: int
    seconds: float
    cpu_ms: float  # CPU ms per mail of `manage.py get_email` (/usr/bin/time -v)
    tickets: int
    acks: int
    rss_mib: float
    note: str = ""

    @property
    def rate(self) -> float:
        return self.mails / self.seconds if self.seconds > 0 else float("nan")


def peer_phase(root: Path, count: int, peers: Path) -> PeerRun:
    """django-helpdesk drains `count` mails, as bench_django_helpdesk.sh runs it, on free ports."""
    py = PEER_VENV / "bin" / "python"
    ok = py.exists() and subprocess.run([str(py), "-c", "import helpdesk"], check=False).returncode
    if not py.exists() or ok != 0:
        common.log(f"installing django-helpdesk {PEER_VERSION} into {PEER_VENV} (first run)")
        subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
        subprocess.run(
            [str(PEER_VENV / "bin" / "pip"), "install", "-q", f"django-helpdesk=={PEER_VERSION}"],
            check=True,
        )
    if not Path("/usr/bin/time").exists():
        subprocess.run(["apt-get", "install", "-y", "-qq", "time"], check=True)
    port, ssl_port = common.free_port(), common.free_port()
    work = root / "peer"
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PEER_DOVECOT_DIR=str(work / "dovecot"), PEER_RESET="1")
    subprocess.run(
        ["bash", str(peers / "dovecot-up.sh"), str(port), str(ssl_port)],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    out = work / "results.json"
    try:
        res = subprocess.run(
            [
                str(py),
                str(peers / PEER_SCRIPT),
                "--mails",
                str(count),
                "--runs",
                "1",
                "--port",
                str(port),
                "--venv",
                str(PEER_VENV),
                "--workdir",
                str(work / "dh"),
                "--out",
                str(out),
            ],
            capture_output=True,
            text=True,
            timeout=3600,
            check=False,
        )
    finally:
        subprocess.run(
            ["bash", str(peers / "dovecot-down.sh"), str(port)],
            env=env,
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    if res.returncode != 0 or not out.exists():
        raise RuntimeError(
            f"the peer failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}"
        )
    run = json.loads(out.read_text())["runs"][0]
    return PeerRun(
        mails=int(run["mails"]),
        seconds=float(run["wall_s"]),
        cpu_ms=float(run["cpu_ms_per_mail"]),
        tickets=int(run["verify"]["tickets"]),
        acks=int(run["acks_in_outbox"]),
        rss_mib=float(run["time_v"].get("maxrss_kb", 0)) / 1024,
        note=f"second get_email +{run['second_run']['new_tickets']} tickets;"
        f" mailbox after {run['mailbox_after']}",
    )


# ---------------------------------------------------------------------------------- /proc


def tree_cpu_by_pid(root: int | None) -> dict[int, float]:
    """pid -> user + system CPU seconds for `root`'s process tree: each living process's own time
    plus what it collected from reaped children (cutime/cstime), so a worker process that exited
    and was waited for still counts. Zombies still show their own time until they are reaped."""
    out: dict[int, float] = {}
    if root is None:
        return out
    for pid in common.tree_pids(root):
        try:
            raw = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        st = raw[raw.rfind(")") + 2 :].split()
        out[pid] = (int(st[11]) + int(st[12]) + int(st[13]) + int(st[14])) / HZ
    return out


def tree_cpu(root: int | None) -> float:
    return sum(tree_cpu_by_pid(root).values())


def label(pid: int) -> str:
    """A short name of a process (argv without paths and config arguments)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return str(pid)
    words = [a.decode(errors="replace").rsplit("/", 1)[-1] for a in argv if a]
    words = [w for w in words if not w.endswith(".toml") and w not in ("-c", "-m", "python3")]
    return " ".join(words)[:40] or str(pid)


def cpu_split(before: dict[int, float], after: dict[int, float], count: int) -> str:
    """CPU ms per mail of each process of the tree between two `tree_cpu_by_pid` readings."""
    parts = [
        f"{label(pid)} {(sec - before.get(pid, 0.0)) * 1000 / count:.2f}"
        for pid, sec in sorted(after.items())
    ]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------- completion


@dataclass
class Done:
    at: float  # time.monotonic() when GET /_sim/tickets first showed them all
    tickets: int  # tickets with their message at that moment
    fetches: int  # full /_sim/tickets fetches made
    fetch_s: float  # wall time they took (a bound on what they cost the simulator)


async def wait_tickets(
    sim_port: int, count: int, attachments: int, within: float, proc: common.Proc
) -> Done:
    """Until /_sim/tickets shows `count` tickets of BACKEND with their message."""
    expect_calls = 2 * count + attachments
    base = f"http://{common.HOST}:{sim_port}"
    fetches, fetch_s = 0, 0.0
    last_full = time.monotonic()
    deadline = last_full + within
    last_took = 0.0
    async with httpx.AsyncClient(base_url=base, timeout=60.0) as http:
        while True:
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"not {count} tickets within {within:.0f}s")
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited; log {proc.log_path}:\n{proc.tail()}")
            r = await http.get("/_sim/calls")
            r.raise_for_status()
            calls = int(r.json().get(BACKEND, 0))
            since = now - last_full
            # Near the end (every mail needs newTicket + addMessage, attachment mails one call
            # more): fetch the list at once when the calls say "all done", else at most a quarter
            # of the time, so that the fetches do not slow down what they measure.
            if (
                (calls >= expect_calls and since >= 0.05)
                or (calls >= 2 * count and since >= 3 * last_took)
                or since >= 2.0
            ):
                t = time.monotonic()
                r = await http.get("/_sim/tickets", params={"system": BACKEND})
                r.raise_for_status()
                seen = time.monotonic()
                last_took = seen - t
                fetches, fetch_s = fetches + 1, fetch_s + last_took
                last_full = seen
                n = sum(1 for t in r.json() if t.get("messages"))
                if n >= count:
                    return Done(seen, n, fetches, fetch_s)
            await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------- phases


@dataclass
class Phase:
    name: str
    count: int = 0
    seconds: float = float("nan")  # the rate's denominator
    seconds_ready: float = float("nan")  # IMAP: from the first /healthz 200
    start_up: float = float("nan")  # s from spawn to /healthz 200
    cpu: float = float("nan")  # daemon tree CPU s in the timed span
    cpu_startup: float = float("nan")  # daemon tree CPU s at /healthz 200, before any mail
    sim_cpu: float = float("nan")
    dovecot_cpu: float = float("nan")
    procs: list[str] = field(default_factory=list)  # the daemon's tree at the end
    cpu_split: str = ""  # daemon CPU ms per mail by process
    tickets: int = 0
    note: str = ""

    @property
    def rate(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("nan")

    @property
    def rate_ready(self) -> float:
        return self.count / self.seconds_ready if self.seconds_ready > 0 else float("nan")

    def per_mail_ms(self, cpu: float) -> float:
        return cpu * 1000 / self.count if self.count else float("nan")


WORKER_PROCESSES = 1  # [gateway] worker_processes of the daemon (--worker-processes)


def gateway_config(workdir: Path, ports: common.Ports, imap: dict[str, Any] | None) -> Path:
    overrides: dict[str, Any] = {
        "gateway": {"worker_processes": WORKER_PROCESSES},
        # an acknowledgement per ticket, as the peer sends one (its 250 senders would otherwise
        # be capped at 5 an hour each)
        "ack": {"rate_limit": 1_000_000, "domain_rate_limit": 0, "global_rate_limit": 0},
    }
    if imap is not None:
        overrides["imap"] = [imap]
    return common.write_config(workdir, ports, overrides)


def _wait_ready(proc: common.Proc, ports: common.Ports, timeout: float = 60.0) -> float:
    common._wait_http(proc, f"http://{common.HOST}:{ports.health}/healthz", timeout)
    return time.monotonic()


def imap_phase(
    root: Path, mails: list[BenchMail], tag: str, within: float
) -> tuple[Phase, DovecotServer]:
    phase = Phase("IMAP backlog", count=len(mails))
    log_dir = root / "imap"
    dovecot = DovecotServer.create()
    try:
        box = dovecot.add_mailbox(RCPT, "bench-pass")
        t = time.monotonic()
        box.append(m.as_delivered() for m in mails)
        common.log(f"APPENDed {len(mails)} mails to Dovecot in {time.monotonic() - t:.1f}s")
        ports = common.Ports.pick()
        sim = common.start_simulator(log_dir, ports)
        try:
            cfg = gateway_config(
                log_dir,
                ports,
                {
                    "name": "bench-mailbox",
                    "host": common.HOST,
                    "port": dovecot.port,
                    "security": "plain",
                    "username": RCPT,
                    "password": "bench-pass",
                    "folders": ["INBOX"],
                    "after": "move",
                    "move_to": "Processed",
                },
            )
            dove_pid = dovecot.proc.pid if dovecot.proc else None
            sim_cpu0, dove_cpu0 = tree_cpu(sim.pid), tree_cpu(dove_pid)
            t0 = time.monotonic()
            gw = common.Proc(
                "gateway run",
                [common.gateway_exe(), "run", "-c", str(cfg)],
                log_dir / "gateway.log",
                cwd=log_dir,
            )
            try:
                t_ready = _wait_ready(gw, ports)
                phase.start_up = t_ready - t0
                done = asyncio.run(
                    wait_tickets(ports.sim_http, len(mails), attachments(mails), within, gw)
                )
                by_pid = tree_cpu_by_pid(gw.pid)
                phase.cpu = sum(by_pid.values())
                phase.sim_cpu = tree_cpu(sim.pid) - sim_cpu0
                phase.dovecot_cpu = tree_cpu(dove_pid) - dove_cpu0
                phase.procs = [label(pid) for pid in sorted(by_pid)]
                phase.cpu_split = cpu_split({}, by_pid, len(mails))
                phase.seconds = done.at - t0
                phase.seconds_ready = done.at - t_ready
                phase.tickets = done.tickets
                left, moved = box.count("INBOX"), box.count("Processed")
                errs = gw.errors()
                phase.note = (
                    f"INBOX {left} left, {moved} moved;"
                    f" {done.fetches} list fetches ({done.fetch_s:.2f}s)"
                    + (f"; errors: {errs}" if errs else "")
                )
            finally:
                gw.stop()
        finally:
            sim.stop()
    except Exception:
        dovecot.cleanup()
        raise
    return phase, dovecot


def smtp_phase(root: Path, mails: list[BenchMail], within: float) -> Phase:
    phase = Phase(f"SMTP, {SMTP_CLIENTS} clients", count=len(mails))
    log_dir = root / "smtp"
    ports = common.Ports.pick()
    sim = common.start_simulator(log_dir, ports)
    try:
        cfg = gateway_config(log_dir, ports, None)
        t0 = time.monotonic()
        gw = common.start_gateway(cfg, ports)
        try:
            phase.start_up = time.monotonic() - t0
            time.sleep(0.5)  # let start-up settle (lazy imports, first spool checkpoint)
            phase.cpu_startup = tree_cpu(gw.pid)

            n_att = attachments(mails)

            async def go() -> tuple[Done, common.LoadResult, float, float]:
                waiter = asyncio.create_task(
                    wait_tickets(ports.sim_http, len(mails), n_att, within, gw)
                )
                sim0 = tree_cpu(sim.pid)
                start = time.monotonic()
                load = await common.run_load(
                    ports.smtp,
                    clients=SMTP_CLIENTS,
                    count=len(mails),
                    mail_for=lambda i: (mails[i].sender, RCPT, mails[i].raw),
                )
                done = await waiter
                return done, load, start, tree_cpu(sim.pid) - sim0

            before = tree_cpu_by_pid(gw.pid)
            done, load, start, phase.sim_cpu = asyncio.run(go())
            after = tree_cpu_by_pid(gw.pid)
            phase.seconds = done.at - start
            phase.cpu = sum(after.values()) - sum(before.values())
            phase.procs = [label(pid) for pid in sorted(after)]
            phase.cpu_split = cpu_split(before, after, len(mails))
            phase.tickets = done.tickets
            errs = gw.errors()
            phase.note = (
                f"all 250 after {load.elapsed:.1f}s ({load.rate:.0f}/s), refused "
                f"{load.error_text()}; {done.fetches} list fetches ({done.fetch_s:.2f}s)"
                + (f"; errors: {errs}" if errs else "")
            )
        finally:
            gw.stop()
    finally:
        sim.stop()
    return phase


# ---------------------------------------------------------------------------------- report


def report(run: int, imap: Phase, smtp: Phase, peer: PeerRun | None) -> None:
    rows: list[list[object]] = []
    nan = float("nan")
    for p in (imap, smtp):
        rows.append(
            [
                p.name,
                p.count,
                p.tickets,
                p.seconds,
                p.rate,
                p.rate / peer.rate if peer else nan,
                p.per_mail_ms(p.cpu),
                p.per_mail_ms(p.cpu) / peer.cpu_ms if peer else nan,
                p.per_mail_ms(p.sim_cpu),
                p.per_mail_ms(p.dovecot_cpu),
                len(p.procs),
            ]
        )
    if peer is not None:
        rows.append(
            [
                f"django-helpdesk {PEER_VERSION}",
                peer.mails,
                peer.tickets,
                peer.seconds,
                peer.rate,
                1.0,
                peer.cpu_ms,
                1.0,
                "",
                "",
                1,
            ]
        )
        rows.append(
            ["target (IMAP)", "", "", "", "", f">= {TARGET_RATE:g}", "", "<= 0.33", "", "", ""]
        )
    common.print_table(
        [
            "path",
            "mails",
            "tickets",
            "s",
            "mails/s",
            "x peer",
            "CPU ms/mail",
            "x peer CPU",
            "sim CPU ms/mail",
            "dovecot CPU ms/mail",
            "procs",
        ],
        rows,
        title=f"run {run}: backlog of {imap.count} mails -> tickets in {BACKEND},"
        f" worker_processes = {WORKER_PROCESSES}",
    )
    if peer is not None:
        speed, cpu = imap.rate / peer.rate, imap.per_mail_ms(imap.cpu) / peer.cpu_ms
        print(
            f"  IMAP vs peer: {speed:.2f}x the mails/s (target >= {TARGET_RATE:g}x:"
            f" {'met' if speed >= TARGET_RATE else 'NOT met'}), {cpu:.2f}x the CPU per mail"
            f" (target <= 0.33x: {'met' if cpu <= TARGET_CPU else 'NOT met'})"
        )
        print(
            f"  peer: {peer.acks} acks in its outbox, peak RSS {peer.rss_mib:.0f} MiB; {peer.note}"
        )
    print(
        f"  IMAP: daemon start-up (spawn -> /healthz 200) {imap.start_up:.2f}s is inside its time;"
        f" from /healthz 200: {imap.seconds_ready:.2f}s = {imap.rate_ready:.0f} mails/s."
    )
    print(
        f"  daemon start-up CPU (SMTP daemon, before any mail): {smtp.cpu_startup * 1000:.0f} ms,"
        f" i.e. {smtp.per_mail_ms(smtp.cpu_startup):.2f} ms/mail of the IMAP figure;"
        f" IMAP without it ~{imap.per_mail_ms(imap.cpu - smtp.cpu_startup):.2f} ms/mail."
    )
    print(f"  daemon process tree: {', '.join(imap.procs)}")
    print(f"  daemon CPU ms/mail by process: IMAP {imap.cpu_split}; SMTP {smtp.cpu_split}")
    print(f"  IMAP: {imap.note}")
    print(f"  SMTP: {smtp.note}")
    sys.stdout.flush()


def summary(results: list[tuple[Phase, Phase, PeerRun | None]]) -> None:
    if len(results) < 2:
        return
    rows: list[list[object]] = []
    nan = float("nan")
    for i, (imap, smtp, peer) in enumerate(results, 1):
        rows.append(
            [
                i,
                peer.rate if peer else nan,
                peer.cpu_ms if peer else nan,
                imap.rate,
                imap.rate / peer.rate if peer else nan,
                imap.per_mail_ms(imap.cpu),
                imap.per_mail_ms(imap.cpu) / peer.cpu_ms if peer else nan,
                smtp.rate,
                smtp.per_mail_ms(smtp.cpu),
            ]
        )
    cols = list(zip(*rows, strict=True))
    rows.append(["median", *(common.median([float(v) for v in c]) for c in cols[1:])])
    common.print_table(
        [
            "run",
            "peer mails/s",
            "peer ms/mail",
            "IMAP mails/s",
            "x peer",
            "IMAP ms/mail",
            "x peer CPU",
            "SMTP mails/s",
            "SMTP ms/mail",
        ],
        rows,
        title=f"summary (targets: >= {TARGET_RATE:g}x the peer's mails/s, <= 0.33x its CPU/mail)",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=1000, help="mails in the backlog (1000)")
    ap.add_argument("--runs", type=int, default=1, help="repetitions (1)")
    ap.add_argument("--timeout", type=float, default=300.0, help="s to wait for the tickets")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, spools)")
    ap.add_argument(
        "--worker-processes", type=int, default=2, help="[gateway] worker_processes (2)"
    )
    ap.add_argument("--no-peer", action="store_true", help="do not run django-helpdesk beside it")
    ap.add_argument(
        "--mails",
        choices=("peer", "own"),
        default="peer",
        help="the backlog: the peer's generator (default) or our own mix",
    )
    ap.add_argument("--peers", type=Path, default=PEERS, help=f"the peers directory ({PEERS})")
    ap.add_argument(
        "--no-compile",
        action="store_true",
        help="do not byte-compile the gateway package first (start-up then compiles sources)",
    )
    args = ap.parse_args()
    global WORKER_PROCESSES
    WORKER_PROCESSES = args.worker_processes
    if not args.no_compile:
        common.compile_bytecode()
        common.log("gateway package byte-compiled first, as an installation has it")

    root = Path(tempfile.mkdtemp(prefix="bench-imap-"))
    root.chmod(0o755)  # the peer's Dovecot (its own users) reads its files below it
    common.log(f"work directory {root}; rules: rules/ of the repo")
    results: list[tuple[Phase, Phase, PeerRun | None]] = []
    ok = False
    try:
        for run in range(1, args.runs + 1):
            tag = uuid.uuid4().hex[:8]
            if args.mails == "peer":
                mails = peer_mails(args.peers, args.count)
            else:
                mails = make_mails(args.count, tag)
            sizes = [len(m.raw) for m in mails]
            common.log(
                f"run {run}: {len(mails)} mails, {min(sizes)}-{max(sizes)} bytes "
                f"(mean {sum(sizes) / len(sizes):.0f}), "
                f"{sum(m.has_attachment for m in mails)} with an attachment"
            )
            run_dir = root / f"run{run}"
            peer = None
            if not args.no_peer:
                common.log(f"run {run}: django-helpdesk on the same backlog ...")
                peer = peer_phase(run_dir, args.count, args.peers)
                common.log(f"   {peer.rate:.1f} mails/s, {peer.cpu_ms:.2f} ms CPU/mail")
            imap, dovecot = imap_phase(run_dir, mails, tag, args.timeout)
            dovecot.cleanup()  # before the SMTP phase: nothing else on the cores
            smtp = smtp_phase(run_dir, mails, args.timeout)
            report(run, imap, smtp, peer)
            results.append((imap, smtp, peer))
        summary(results)
        print(
            "\nNoise: daemon, simulator, Dovecot and the load generator share this machine's"
            f" {os.cpu_count()} cores; 10-30 % between runs is usual."
        )
        ok = True
    finally:
        if args.keep or not ok:
            common.log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
