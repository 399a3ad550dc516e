"""IMAP backlog -> tickets: mails/s and CPU ms per mail, with the same mails over SMTP beside it.

Run by hand (never by CI), from the repo root, as root (the private Dovecot needs its mail user):

    .venv/bin/python bench/imap.py                  # 1,000 mails, one run
    .venv/bin/python bench/imap.py --runs 3 --count 1000

Per run:

1. A private Dovecot (tests/imap_server.py: own config under /tmp, plain IMAP on a loopback port)
   gets a backlog of `--count` small mails APPENDed to INBOX: 2-11 KiB each, a quarter of them
   multipart/mixed with an attachment (PDF, text or JPEG bytes, base64), a quarter
   multipart/alternative (text + HTML), the rest text/plain; every mail from its own sender, with
   its own Message-ID, to support@example.com (routed to superoffice-soap by the demo rules). The
   copies in the mailbox carry Return-Path and Delivered-To, as a delivery agent adds them.
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
mail) is printed so that it can be told apart from the per-mail cost in the IMAP figure.

Completion is watched cheaply: /_sim/calls (a few bytes) every 50 ms; the full /_sim/tickets list
(megabytes at 1,000 tickets) is fetched only once the simulator has seen at least two calls per
mail, and every 2 s regardless.

Reference (issue 7): django-helpdesk 2.6.1 with SQLite, on this kind of machine, about 36 mails/s
at about 20 ms CPU per mail for this workload; target >= 5x = 180 mails/s. Everything here (daemon,
simulator, Dovecot, this load generator) shares the machine's cores (2 here); noise between runs
is 10-30 %, so compare figures of the same run. Everything binds and connects to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import random
import shutil
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
REF_RATE = 36.0  # django-helpdesk 2.6.1, mails/s (issue 7)
REF_CPU_MS = 20.0  # its CPU ms per mail
TARGET_FACTOR = 5.0
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

    def as_delivered(self) -> bytes:
        """The copy in the mailbox: what a delivery agent adds in front of it."""
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
    overrides: dict[str, Any] = {"gateway": {"worker_processes": WORKER_PROCESSES}}
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


def report(run: int, imap: Phase, smtp: Phase) -> None:
    target = REF_RATE * TARGET_FACTOR
    rows = []
    for p in (imap, smtp):
        rows.append(
            [
                p.name,
                p.count,
                p.tickets,
                p.seconds,
                p.rate,
                p.rate / REF_RATE,
                p.per_mail_ms(p.cpu),
                p.per_mail_ms(p.sim_cpu),
                p.per_mail_ms(p.dovecot_cpu),
                len(p.procs),
            ]
        )
    rows.append(["django-helpdesk 2.6.1 (ref.)", "", "", "", REF_RATE, 1.0, REF_CPU_MS, "", "", ""])
    rows.append(["target (>= 5x ref.)", "", "", "", target, TARGET_FACTOR, "", "", "", ""])
    common.print_table(
        [
            "path",
            "mails",
            "tickets",
            "s",
            "mails/s",
            "x ref",
            "daemon CPU ms/mail",
            "sim CPU ms/mail",
            "dovecot CPU ms/mail",
            "procs",
        ],
        rows,
        title=f"run {run}: backlog of {imap.count} mails (2-11 KiB) -> tickets in {BACKEND}",
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


def summary(results: list[tuple[Phase, Phase]]) -> None:
    if len(results) < 2:
        return
    rows = []
    for i, (imap, smtp) in enumerate(results, 1):
        rows.append(
            [
                i,
                imap.rate,
                imap.rate_ready,
                imap.per_mail_ms(imap.cpu),
                imap.per_mail_ms(imap.sim_cpu),
                smtp.rate,
                smtp.per_mail_ms(smtp.cpu),
                smtp.per_mail_ms(smtp.sim_cpu),
            ]
        )
    cols = list(zip(*rows, strict=True))
    rows.append(["median", *(common.median([float(v) for v in c]) for c in cols[1:])])
    common.print_table(
        [
            "run",
            "IMAP mails/s",
            "IMAP from ready",
            "IMAP daemon ms/mail",
            "IMAP sim ms/mail",
            "SMTP mails/s",
            "SMTP daemon ms/mail",
            "SMTP sim ms/mail",
        ],
        rows,
        title=f"summary (reference {REF_RATE:.0f} mails/s at ~{REF_CPU_MS:.0f} ms CPU/mail;"
        f" target >= {REF_RATE * TARGET_FACTOR:.0f} mails/s)",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--count", type=int, default=1000, help="mails in the backlog (1000)")
    ap.add_argument("--runs", type=int, default=1, help="repetitions (1)")
    ap.add_argument("--timeout", type=float, default=300.0, help="s to wait for the tickets")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, spools)")
    ap.add_argument(
        "--worker-processes", type=int, default=1, help="[gateway] worker_processes (1)"
    )
    args = ap.parse_args()
    global WORKER_PROCESSES
    WORKER_PROCESSES = args.worker_processes

    root = Path(tempfile.mkdtemp(prefix="bench-imap-"))
    common.log(f"work directory {root}; rules: rules/ of the repo")
    results: list[tuple[Phase, Phase]] = []
    ok = False
    try:
        for run in range(1, args.runs + 1):
            tag = uuid.uuid4().hex[:8]
            mails = make_mails(args.count, tag)
            sizes = [len(m.raw) for m in mails]
            common.log(
                f"run {run}: {len(mails)} mails, {min(sizes)}-{max(sizes)} bytes "
                f"(mean {sum(sizes) / len(sizes):.0f}), "
                f"{sum(m.has_attachment for m in mails)} with an attachment"
            )
            run_dir = root / f"run{run}"
            imap, dovecot = imap_phase(run_dir, mails, tag, args.timeout)
            dovecot.cleanup()  # before the SMTP phase: nothing else on the cores
            smtp = smtp_phase(run_dir, mails, args.timeout)
            report(run, imap, smtp)
            results.append((imap, smtp))
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
