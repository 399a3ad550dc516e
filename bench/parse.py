"""Memory of the whole daemon for one 10 MiB mail, and parse time per size class.

Run by hand (never by CI), from the repo root:

    .venv/bin/python bench/parse.py                 # both parts
    .venv/bin/python bench/parse.py --skip-memory   # parse times only

1. Memory (issue 5: < 4x the mail's size). `gateway simulate` and `gateway run` (a config from
   config.example.toml with [smtp] max_size and the superoffice-soap attachment limits at 30 MiB,
   so that nothing is cut). One small warm-up mail goes through first (the parse process, zeep's
   WSDL and the backend session exist afterwards, as in a daemon that has been running), then the
   idle level is read. Then one mail of `--mail-mib` MiB (text + HTML, 3 attachments of random
   bytes, base64) is sent over SMTP to support@example.com (-> superoffice-soap) and the clock runs
   until GET /_sim/tickets shows its ticket with the 3 attachments; sampling goes on 1 s after.

   A thread samples every 20 ms the daemon's whole process tree (the main process and every
   descendant, whatever the architecture: worker process, parse pool, forkserver) from /proc:
   the sum of VmRSS (the tree's resident memory at that instant) and, per process, VmHWM. Before
   the big mail the peak marks are reset (`echo 5 > /proc/PID/clear_refs`), so VmHWM is the peak
   of this mail alone. Figures, above the idle level (the median of the tree's RSS over 1 s):
   - sampled peak: the highest RSS sum seen by the sampler (may miss a spike shorter than 20 ms);
   - HWM bound: the sum of the per-process peaks (VmHWM; peaks of different processes need not
     coincide, so this is an upper bound of the tree's peak). This is the figure held to 4x.
   The simulator's tree is measured the same way, separately (it is not the gateway).
   RSS counts pages shared between forked processes once per process; idle levels carry that too.

2. Parse time: `gateway.mail.parse` in this process on mails of 5 KiB, 200 KiB and 10 MiB (text +
   HTML + 1, 2, 3 attachments), median of several runs after a warm-up; one more run under
   tracemalloc for the peak Python allocation.

Everything binds and connects to 127.0.0.1 only. The machine (2 cores) is shared: times carry
10-30 % noise; memory figures are steadier.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import common  # noqa: E402

from gateway.mail import parse  # noqa: E402

MIB = 1024 * 1024
RCPT = "support@example.com"
BACKEND = "superoffice-soap"
# the demo rules route each recipient to one backend type (config.example.toml + rules/)
RECIPIENTS = {
    "superoffice-soap": "support@example.com",
    "superoffice-rest": "sales@example.com",
    "interserver": "hosting@example.com",  # takes no attachments: they are named in the text
    "whmcs": "billing@example.com",
}
TARGET_FACTOR = 4.0
LIMIT = 30 * MIB  # max_size and the backend's attachment limits
SIZES = {"5 KiB": (5 * 1024, 1), "200 KiB": (200 * 1024, 2), "10 MiB": (10 * MIB, 3)}


# ---------------------------------------------------------------------------------- the mail


def make_mail(size: int, attachments: int, tag: str = "bench") -> bytes:
    """A multipart/mixed mail of about `size` bytes: text/plain + HTML, then `attachments`
    base64 attachments of random bytes sharing what is left (CRLF line ends)."""
    text = (
        "Hallo Support,\n\nunser Drucker im zweiten Stock druckt seit dem Update nur noch leere "
        "Seiten. Im Anhang die Protokolle und ein Foto der Anzeige.\n\nGrüße, Jörg Müller\n"
    ) * 4
    html = "<html><body><p>" + text.replace("\n", "<br>\n") + "</p></body></html>\n"
    head = (
        "From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@customer.example>\r\n"
        f"To: Support <{RCPT}>\r\n"
        "Cc: a@customer.example, b@customer.example\r\n"
        f"Subject: Drucker druckt nicht ({tag})\r\n"
        "Date: Mon, 10 Jun 2024 08:00:00 +0200\r\n"
        f"Message-ID: <{tag}-{uuid.uuid4().hex}@customer.example>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n'
        '--mix\r\nContent-Type: multipart/alternative; boundary="alt"\r\n\r\n'
        "--alt\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit"
        "\r\n\r\n" + text.replace("\n", "\r\n") + "\r\n"
        "--alt\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit"
        "\r\n\r\n" + html.replace("\n", "\r\n") + "--alt--\r\n"
    ).encode()
    tail = b"--mix--\r\n"
    names = [("protokoll.log", "text/plain"), ("anzeige.jpg", "image/jpeg"), ("dump.bin", "")]
    part_heads = []
    for i in range(attachments):
        name, ctype = names[i % len(names)]
        name = f"{i + 1}-{name}"
        part_heads.append(
            f'--mix\r\nContent-Type: {ctype or "application/octet-stream"}; name="{name}"\r\n'
            f'Content-Disposition: attachment; filename="{name}"\r\n'
            "Content-Transfer-Encoding: base64\r\n\r\n".encode()
        )
    room = size - len(head) - len(tail) - sum(len(h) for h in part_heads)
    # base64 with 76-character lines and CRLF: 78 bytes per 57 input bytes
    per = max(1, room // max(1, attachments) * 57 // 78)
    parts = [head]
    for h in part_heads:
        parts += [h, base64.encodebytes(os.urandom(per)).replace(b"\n", b"\r\n")]
    parts.append(tail)
    return b"".join(parts)


# ---------------------------------------------------------------------------------- /proc


def _status(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) of one process in KiB; None when it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    rss = hwm = -1
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
        elif line.startswith("VmRSS:"):
            rss = int(line.split()[1])
            break  # VmRSS comes after VmHWM
    return (rss, hwm) if rss >= 0 and hwm >= 0 else None


def _label(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {pid}"
    words = [a.decode(errors="replace").rsplit("/", 1)[-1] for a in argv if a]
    words = [w for w in words if not w.endswith(".toml") and w not in ("-c", "-m", "python3")]
    return f"{pid} {' '.join(words)[:50]}"


def reset_peaks(root: int) -> int:
    """Reset VmHWM to the current VmRSS for every process of the tree; how many were reset."""
    n = 0
    for pid in common.tree_pids(root):
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            n += 1
        except OSError:
            pass
    return n


@dataclass
class TreeSampler:
    """Samples a process tree's memory every `interval` seconds in a thread."""

    root: int
    interval: float = 0.02
    samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, RSS sum KiB)
    hwm: dict[int, int] = field(default_factory=dict)  # pid -> last VmHWM seen
    rss_at_peak: dict[int, int] = field(default_factory=dict)  # pid -> RSS at the sum's peak
    labels: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _peak: int = -1

    def sample(self) -> int:
        total = 0
        per: dict[int, int] = {}
        for pid in common.tree_pids(self.root):
            st = _status(pid)
            if st is None:
                continue
            rss, hwm = st
            per[pid] = rss
            total += rss
            self.hwm[pid] = hwm
            if pid not in self.labels:
                self.labels[pid] = _label(pid)
        self.samples.append((time.monotonic(), total))
        if total > self._peak:
            self._peak, self.rss_at_peak = total, per
        return total

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mem-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()

    @property
    def peak(self) -> int:
        return max(t for _, t in self.samples) if self.samples else 0

    @property
    def hwm_sum(self) -> int:
        return sum(self.hwm.values())


def idle_level(
    root: int, seconds: float = 1.0, interval: float = 0.02
) -> tuple[int, dict[int, int]]:
    """Median of the tree's RSS sum over `seconds`, and each process's RSS at the end (KiB)."""
    totals = []
    per: dict[int, int] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        per = {}
        for pid in common.tree_pids(root):
            st = _status(pid)
            if st is not None:
                per[pid] = st[0]
        totals.append(sum(per.values()))
        time.sleep(interval)
    return int(statistics.median(totals)), per


# ---------------------------------------------------------------------------------- part 1


async def wait_ticket(sim_port: int, tag: str, attachments: int, within: float) -> dict[str, Any]:
    """The simulator's ticket whose title has `tag`, once its message has the attachments."""
    deadline = time.monotonic() + within
    async with httpx.AsyncClient(base_url=f"http://{common.HOST}:{sim_port}", timeout=60) as http:
        while True:
            r = await http.get("/_sim/tickets", params={"system": BACKEND})
            r.raise_for_status()
            for t in r.json():
                if tag in str(t.get("title", "")):
                    msgs = t.get("messages") or []
                    if msgs and len(msgs[0].get("attachments") or []) >= attachments:
                        return dict(t)
            if time.monotonic() > deadline:
                raise RuntimeError(f"no ticket for {tag} with {attachments} attachments")
            await asyncio.sleep(0.05)


def _atts(n: int) -> int:
    return 0 if BACKEND == "interserver" else n


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def memory_part(root: Path, mail_mib: float, within: float) -> None:
    ports = common.Ports.pick()
    sim = common.start_simulator(root, ports)
    try:
        limits = {"max_attachment_bytes": LIMIT, "max_total_attachment_bytes": LIMIT}
        cfg = common.write_config(
            root, ports, {"smtp": {"max_size": LIMIT}, "backends": {BACKEND: limits}}
        )
        gw = common.start_gateway(cfg, ports)
        try:
            # warm-up: one small mail with an attachment, all the way to its ticket
            tag = f"warm-{uuid.uuid4().hex[:8]}"
            small = make_mail(20 * 1024, 1, tag)
            asyncio.run(common.send_one(ports.smtp, "joerg@customer.example", RCPT, small))
            asyncio.run(wait_ticket(ports.sim_http, tag, _atts(1), within))
            time.sleep(1.0)  # acknowledgement, spool writes, garbage collection
            idle, idle_per = idle_level(gw.pid)
            sim_idle, _ = idle_level(sim.pid, 0.3)
            reset_peaks(gw.pid)
            reset_peaks(sim.pid)

            tag = f"big-{uuid.uuid4().hex[:8]}"
            big = make_mail(int(mail_mib * MIB), 3, tag)
            daemon, simul = TreeSampler(gw.pid), TreeSampler(sim.pid)
            daemon.start()
            simul.start()
            t0 = time.monotonic()
            acked = asyncio.run(common.send_one(ports.smtp, "joerg@customer.example", RCPT, big))
            ticket = asyncio.run(wait_ticket(ports.sim_http, tag, _atts(3), within))
            t_ticket = time.monotonic()
            time.sleep(1.0)
            daemon.stop()
            simul.stop()
            errs = gw.errors()
        finally:
            gw.stop()
    finally:
        sim.stop()

    size_kib = len(big) / 1024
    sampled = daemon.peak - idle
    bound = daemon.hwm_sum - idle
    print(
        f"\nmemory: one {len(big) / MIB:.2f} MiB mail ({len(big)} bytes; text + HTML + 3 base64"
        f" attachments, each {len(big) / 3 / MIB:.1f} MiB encoded = {len(big) * 57 / 78 / 3 / MIB:.1f}"
        f" MiB of random bytes) over SMTP -> {BACKEND}"
        f" ticket #{ticket['id']} ({len(ticket['messages'][0]['attachments'])} attachments)"
    )
    print(
        f"  SMTP 250 after {acked - t0:.2f}s, ticket seen after {t_ticket - t0:.2f}s;"
        f" {len(daemon.samples)} samples every {daemon.interval * 1000:.0f} ms"
    )
    rows = []
    for pid in sorted(daemon.hwm):
        rows.append(
            [
                daemon.labels.get(pid, str(pid)),
                _mib(idle_per.get(pid, 0)),
                _mib(daemon.rss_at_peak.get(pid, 0)),
                _mib(daemon.hwm[pid]),
                _mib(daemon.hwm[pid] - idle_per.get(pid, 0)),
            ]
        )
    common.print_table(
        ["daemon process", "idle RSS MiB", "RSS at peak MiB", "VmHWM MiB", "HWM - idle MiB"],
        rows,
        title="per process of the daemon's tree",
    )
    target = TARGET_FACTOR * size_kib
    common.print_table(
        ["tree", "idle MiB", "peak MiB", "above idle MiB", "x mail size", "target"],
        [
            [
                "daemon, sampled RSS sum",
                _mib(idle),
                _mib(daemon.peak),
                _mib(sampled),
                f"{sampled / size_kib:.2f}x",
                f"< {TARGET_FACTOR:.0f}x",
            ],
            [
                "daemon, sum of VmHWM (bound)",
                _mib(idle),
                _mib(daemon.hwm_sum),
                _mib(bound),
                f"{bound / size_kib:.2f}x",
                f"< {TARGET_FACTOR:.0f}x",
            ],
            [
                "simulator, sum of VmHWM",
                _mib(sim_idle),
                _mib(simul.hwm_sum),
                _mib(simul.hwm_sum - sim_idle),
                f"{(simul.hwm_sum - sim_idle) / size_kib:.2f}x",
                "(not the gateway)",
            ],
        ],
        title=f"peak resident memory above idle, for a {len(big) / MIB:.1f} MiB mail",
    )
    print(
        f"  result: {bound / size_kib:.2f}x the mail's size (bound), target < 4x:"
        f" {'met' if bound < target else 'NOT met'}" + (f"; daemon errors: {errs}" if errs else "")
    )
    sys.stdout.flush()


# ---------------------------------------------------------------------------------- part 2


def parse_part(repeat: int) -> None:
    rows = []
    for label, (size, attachments) in SIZES.items():
        raw = make_mail(size, attachments)
        n = repeat or (200 if size < 100_000 else 30 if size < MIB else 7)
        mail = parse(raw)  # warm-up (imports, caches)
        assert len(mail.attachments) == attachments, (label, len(mail.attachments))
        times = []
        for _ in range(n):
            t = time.perf_counter()
            parse(raw)
            times.append((time.perf_counter() - t) * 1000)
        tracemalloc.start()
        parse(raw)
        _cur, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append(
            [
                label,
                len(raw),
                attachments,
                n,
                statistics.median(times),
                min(times),
                max(times),
                f"{peak / len(raw):.1f}x",
            ]
        )
    common.print_table(
        ["class", "bytes", "attachments", "runs", "median ms", "min ms", "max ms", "peak alloc"],
        rows,
        title="gateway.mail.parse, in this process (peak alloc: tracemalloc, one run)",
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mail-mib", type=float, default=10.0, help="size of the big mail (10)")
    ap.add_argument("--repeat", type=int, default=0, help="parse runs per class (by size)")
    ap.add_argument("--timeout", type=float, default=120.0, help="s to wait for a ticket")
    ap.add_argument("--skip-memory", action="store_true", help="parse times only")
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, spool)")
    ap.add_argument(
        "--backends",
        default="superoffice-soap",
        help="comma-separated backend types for the memory part, or 'all' (default SOAP)",
    )
    args = ap.parse_args()
    global BACKEND, RCPT
    types = list(RECIPIENTS) if args.backends == "all" else args.backends.split(",")

    for BACKEND in [] if args.skip_memory else types:
        RCPT = RECIPIENTS[BACKEND]
        root = Path(tempfile.mkdtemp(prefix=f"bench-parse-{BACKEND}-"))
        common.log(f"{BACKEND}: work directory {root}; rules: rules/ of the repo")
        done = False
        try:
            memory_part(root, args.mail_mib, args.timeout)
            done = True
        finally:
            if args.keep or not done:
                common.log(f"kept {root}")
            else:
                shutil.rmtree(root, ignore_errors=True)
    parse_part(args.repeat)
    print(
        f"\nNoise: this machine's {os.cpu_count()} cores are shared; times vary 10-30 % between"
        " runs, memory much less."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
