"""Several nodes on one PostgreSQL spool: tickets/s as a share of the latency bound, per node count.

Run by hand (never by CI), from the repo root, as root (the private PostgreSQL runs as `postgres`):

    .venv/bin/python bench/cluster.py                  # 1, 2 and 3 nodes, 300 mails each
    .venv/bin/python bench/cluster.py --nodes 1,3 --count 400
    .venv/bin/python bench/cluster.py --rate 0,80      # a burst, then the same mails at 80/s
    .venv/bin/python bench/cluster.py --nodes "" --imap 1000   # only the IMAP backlog figure

For each node count N: a fresh database in a private PostgreSQL cluster (tests/pg_server.py), a
fresh `gateway simulate`, and N `gateway run` processes sharing that database, each with its own
SMTP and health ports (`[gateway] node = "nI"`). Every simulated call is answered 100 ms late;
superoffice-soap (support@: newTicket + addMessage = 2 calls per ticket) has `concurrency = 8`,
which the gateway holds for the whole cluster. After a warm-up mail per node (sessions cached),
`--count` mails are sent over SMTP by 8 concurrent clients, spread round-robin over the nodes; the
clock runs from the first 250 to the moment the simulator holds all tickets with their message.
By default the clients send as fast as their mails are accepted (a burst); `--rate R` paces them
to R mails/s together (above the bound, so that the queue never runs dry).

While a burst comes in, the nodes' intakes take the CPU first (their workers run niced, SCHED_BATCH)
and, with N nodes on this one machine, N intakes can take all of its cores: ticketing nearly stops
until the burst is stored. So the table also gives the share of the bound after the last 250
("x bound after it": the tickets not yet made then, over the time they took), which is what the
nodes do once the intakes are quiet, and which is what a site with a host per node sees.

Then (`--imap`, 600 mails, 2 interleaved pairs) one node on a fresh database drains an [[imap]]
backlog from a private Dovecot (bench/imap.py's mails) with `worker_processes = 1`, then 2; the
simulator answers at once there, so mails/s is what the node's CPU allows, and 2 / 1 is what the
second worker process buys on this machine (its 2 cores also run Dovecot, PostgreSQL and the
simulator).

The latency bound is concurrency / (calls per ticket x latency) = 8 / 0.2 s = 40 tickets/s,
whatever the node count: adding nodes must cost nothing (target >= 0.8 of the bound for every N).
The simulator's /_sim/inflight shows the most calls it saw at once (must stay <= 8). Everything
(nodes, PostgreSQL, simulator, load) shares this machine's cores; noise is 10-30 % between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

from tests.pg_server import PostgresServer

LATENCY_MS = 100
LIMIT = 8
CALLS = 2  # superoffice-soap: newTicket + addMessage


def node_config(
    work: Path, name: str, ports: common.Ports, url: str, nice: int, scheduling: str
) -> Path:
    """A node's config; `url` "" = its own SQLite spool (the one-node reference)."""
    return common.write_config(
        work / name,
        ports,
        {
            "gateway": {
                "node": name,
                "workers": 16,
                "worker_nice": nice,
                "worker_scheduling": scheduling,
            },
            "backends": {"superoffice-soap": {"concurrency": LIMIT}},
        },
        spool_url=url,
    )


async def send_all(
    ports: list[int], count: int, tag: str, clients: int = 8, rate: float = 0.0
) -> tuple[float, float]:
    """Send `count` mails round-robin over `ports` with `clients` senders; times of the first
    and the last 250. `rate` > 0: mail i is sent no earlier than i / rate seconds after the
    start (paced); 0: each sender sends its next mail as soon as the last one is accepted."""
    first: list[float] = []
    last = 0.0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)
    begin = time.monotonic()

    async def sender() -> None:
        nonlocal last
        while not queue.empty():
            i = queue.get_nowait()
            if rate > 0:
                await asyncio.sleep(max(0.0, begin + i / rate - time.monotonic()))
            data = common.make_mail(f"c{i % 50}@example.org", "support@example.com", f"{tag} {i}")
            for _ in range(50):
                try:
                    await aiosmtplib.send(
                        data,
                        sender=f"c{i % 50}@example.org",
                        recipients=["support@example.com"],
                        hostname=common.HOST,
                        port=ports[i % len(ports)],
                        timeout=60,
                    )
                    break
                except aiosmtplib.SMTPException:
                    await asyncio.sleep(0.2)
            if not first:
                first.append(time.monotonic())
            last = max(last, time.monotonic())

    await asyncio.gather(*(sender() for _ in range(clients)))
    return first[0], last


async def tickets_done(sim: common.SimClient, tag: str, count: int) -> bool:
    calls = await sim.calls()
    if calls.get("superoffice-soap", 0) < CALLS * count:
        return False
    found = [t for t in await sim.tickets("superoffice-soap") if t["title"].startswith(tag)]
    return len(found) >= count and all(t["messages"] for t in found)


async def run_nodes(
    pg: PostgresServer,
    work: Path,
    n: int,
    count: int,
    nice: int,
    scheduling: str,
    sqlite: bool = False,
    rate: float = 0.0,
) -> dict[str, Any]:
    url = "" if sqlite else pg.new_database()
    sim_ports = common.Ports.pick()
    sim_proc = common.start_simulator(work / f"sim{n}", sim_ports)
    nodes: list[tuple[common.Proc, common.Ports]] = []
    sim = common.SimClient(sim_ports.sim_http)
    try:
        for i in range(n):
            ports = common.Ports.pick(sim_ports.sim_http, sim_ports.sim_smtp)
            where = work / f"n{n}{'s' if sqlite else ''}-{scheduling}"
            cfg = node_config(where, f"n{i + 1}", ports, url, nice, scheduling)
            nodes.append((common.start_gateway(cfg, ports, timeout=120), ports))
        await sim.fault("superoffice-soap", "slow", latency_ms=LATENCY_MS)
        smtp = [p.smtp for _, p in nodes]
        await send_all(smtp, len(smtp), "warmup", clients=len(smtp))
        if not await common.wait_until(lambda: tickets_done(sim, "warmup", len(smtp)), 120):
            raise RuntimeError("warm-up mails were not ticketed")
        pg_pid = pg_postmaster(pg)
        split0 = cpu_by_role([p.pid for p, _ in nodes])
        cpu0 = (
            sum(common.tree_cpu_seconds(p.pid) for p, _ in nodes),
            common.tree_cpu_seconds(sim_proc.pid),
            common.tree_cpu_seconds(pg_pid) if pg_pid else 0.0,
        )
        calls0 = (await sim.calls()).get("superoffice-soap", 0)
        start, last = await send_all(smtp, count, "burst", rate=rate)
        # tickets made while the load was still coming in (2 calls each), for the share of the
        # bound once it is over: the nodes' intakes no longer compete with their workers
        made = ((await sim.calls()).get("superoffice-soap", 0) - calls0) / CALLS
        ok = await common.wait_until(lambda: tickets_done(sim, "burst", count), 600, 0.1)
        elapsed = time.monotonic() - start
        split = cpu_by_role([p.pid for p, _ in nodes])
        split = {k: (v - split0.get(k, 0.0)) * 1000 / count for k, v in split.items()}
        cpu = (
            sum(common.tree_cpu_seconds(p.pid) for p, _ in nodes) - cpu0[0],
            common.tree_cpu_seconds(sim_proc.pid) - cpu0[1],
            (common.tree_cpu_seconds(pg_pid) - cpu0[2]) if pg_pid else float("nan"),
        )
        if not ok:
            raise RuntimeError(f"{n} nodes: not all {count} tickets within 600 s")
        async with httpx.AsyncClient(timeout=10) as http:
            inflight = (await http.get(f"{sim.base}/_sim/inflight")).json()["superoffice-soap"]
        rate = count / elapsed
        bound = LIMIT / (CALLS * LATENCY_MS / 1000)
        return {
            "tickets_s": rate,
            "bound": bound,
            "share": rate / bound,
            "max": inflight["max"],
            "accept_s": count / max(1e-6, last - start),
            "after_s": start + elapsed - last,
            "after_share": (count - made) / max(1e-6, start + elapsed - last) / bound,
            "cpu_ms": [c * 1000 / count for c in cpu],
            "split": split,
        }
    finally:
        await sim.aclose()
        for proc, _ in nodes:
            proc.stop()
        sim_proc.stop()


async def imap_backlog(
    pg: PostgresServer, work: Path, count: int, processes: int, run: int
) -> dict[str, float]:
    """One node on a fresh PostgreSQL spool drains a backlog of `count` mails from one [[imap]]
    mailbox (a private Dovecot) with `processes` worker processes; the simulator answers at
    once (no latency fault), so the figure is what the node's CPU allows. Mails/s from the
    node's first /healthz 200 to the last ticket with its message."""
    import imap as imapbench  # bench/imap.py: the same mails and the same completion watch
    from imap_server import DovecotServer

    mails = imapbench.make_mails(count, f"wp{processes}r{run}")
    dovecot = DovecotServer.create()
    where = work / f"imap-wp{processes}-{run}"
    try:
        box = dovecot.add_mailbox(imapbench.RCPT, "bench-pass")
        box.append(m.as_delivered() for m in mails)
        ports = common.Ports.pick()
        sim_proc = common.start_simulator(where / "sim", ports)
        try:
            cfg = common.write_config(
                where / "node",
                ports,
                {
                    "gateway": {"node": "n1", "worker_processes": processes},
                    "ack": {
                        "rate_limit": 1_000_000,
                        "domain_rate_limit": 0,
                        "global_rate_limit": 0,
                    },
                    "imap": [
                        {
                            "name": "bench-mailbox",
                            "host": common.HOST,
                            "port": dovecot.port,
                            "security": "plain",
                            "username": imapbench.RCPT,
                            "password": "bench-pass",
                            "folders": ["INBOX"],
                            "after": "move",
                            "move_to": "Processed",
                        }
                    ],
                },
                spool_url=pg.new_database(),
            )
            node = common.start_gateway(cfg, ports, timeout=120)
            try:
                ready = time.monotonic()
                cpu0 = common.tree_cpu_seconds(node.pid)
                done = await imapbench.wait_tickets(
                    ports.sim_http, count, imapbench.attachments(mails), 600, node
                )
                cpu = common.tree_cpu_seconds(node.pid) - cpu0
                left = box.count("INBOX")
            finally:
                node.stop()
        finally:
            sim_proc.stop()
    finally:
        dovecot.cleanup()
    if left:
        raise RuntimeError(f"{left} mails left in INBOX")
    seconds = done.at - ready
    return {"mails_s": count / seconds, "cpu_ms": cpu * 1000 / count, "seconds": seconds}


def cpu_by_role(roots: list[int]) -> dict[str, float]:
    """CPU seconds of the nodes' processes summed by role: intake (`gateway run`), worker."""
    out: dict[str, float] = {}
    for root in roots:
        for pid in common.tree_pids(root):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            role = "worker" if b"_worker" in argv else "intake"
            out[role] = (
                out.get(role, 0.0)
                + common.tree_cpu_seconds(pid)
                - sum(common.tree_cpu_seconds(c) for c in common.tree_pids(pid)[1:])
            )
    return out


def pg_postmaster(pg: PostgresServer) -> int | None:
    """The private PostgreSQL's postmaster pid (its backends are its children)."""
    try:
        return int((pg.data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


async def main_async(args: argparse.Namespace) -> int:
    pg = PostgresServer()
    pg.start()
    rows = []
    imap_rows: list[tuple[int, int, dict[str, float]]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
            runs = [(n, False) for n in args.nodes] + ([(1, True)] if args.sqlite else [])
            several = len(args.worker_scheduling) > 1
            for (n, sqlite), scheduling, rate in (
                (run, s, r) for run in runs for s in args.worker_scheduling for r in args.rate
            ):
                what = f"{n} node(s){' on SQLite' if sqlite else ''}"
                if several:
                    what += f", worker {scheduling}"
                sending = f"{rate:g}/s" if rate > 0 else "burst"
                common.log(f"{what}: {args.count} mails, sent {sending}")
                r = await run_nodes(
                    pg, Path(tmp), n, args.count, args.worker_nice, scheduling, sqlite, rate
                )
                common.log(f"{what}: {r['tickets_s']:.1f} tickets/s = {r['share']:.2f} of bound")
                common.log(
                    f"{what}: node CPU ms/ticket by role: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["split"].items()))
                )
                rows.append(
                    [
                        (f"{n} (SQLite)" if sqlite else str(n))
                        + (f" {scheduling}" if several else ""),
                        str(args.count),
                        sending,
                        f"{r['tickets_s']:.1f}",
                        f"{r['bound']:.0f}",
                        f"{r['share']:.2f}",
                        ">= 0.80",
                        str(int(r["max"])),
                        f"{r['accept_s']:.1f}",
                        f"{r['after_s']:.1f}",
                        f"{r['after_share']:.2f}",
                        "/".join(f"{c:.1f}" for c in r["cpu_ms"]),
                    ]
                )
            for run in range(args.imap_runs if args.imap else 0):
                for processes in (1, 2):
                    common.log(f"IMAP backlog, {args.imap} mails, {processes} worker process(es)")
                    r = await imap_backlog(pg, Path(tmp), args.imap, processes, run)
                    common.log(f"   {r['mails_s']:.1f} mails/s, {r['cpu_ms']:.1f} ms CPU/mail")
                    imap_rows.append((run, processes, r))
    finally:
        pg.cleanup()
    if rows:
        common.print_table(
            [
                "nodes",
                "mails",
                "sent",
                "tickets/s",
                "bound/s",
                "x bound",
                "target",
                "max calls in flight",
                "accepted/s",
                "s after last 250",
                "x bound after it",
                "CPU ms/ticket nodes/sim/pg",
            ],
            rows,
        )
        print(
            f"\nbound = concurrency {LIMIT} / ({CALLS} calls x {LATENCY_MS} ms), held cluster-wide;"
            " max calls in flight as the simulator counted them (limit 8)."
        )
    if imap_rows:
        by_run: dict[int, dict[int, dict[str, float]]] = {}
        for run, processes, r in imap_rows:
            by_run.setdefault(run, {})[processes] = r
        print()
        common.print_table(
            [
                "IMAP backlog, 1 node",
                "mails",
                "1 worker: mails/s",
                "CPU ms/mail",
                "2 workers: mails/s",
                "CPU ms/mail",
                "2 / 1",
            ],
            [
                [
                    f"run {run + 1}",
                    str(args.imap),
                    f"{one['mails_s']:.1f}",
                    f"{one['cpu_ms']:.1f}",
                    f"{two['mails_s']:.1f}",
                    f"{two['cpu_ms']:.1f}",
                    f"{two['mails_s'] / one['mails_s']:.2f}x",
                ]
                for run, pair in sorted(by_run.items())
                for one, two in [(pair[1], pair[2])]
            ],
        )
        print(
            "IMAP: [[imap]] backlog in a private Dovecot, PostgreSQL spool, simulator without"
            " latency (CPU-bound), mails/s from /healthz 200 to the last ticket with its message."
        )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument(
        "--nodes",
        type=lambda s: [int(x) for x in s.split(",") if x],
        default=[1, 2, 3],
        help='node counts, comma-separated (1,2,3; "" = only the IMAP backlog)',
    )
    ap.add_argument("--count", type=int, default=300, help="mails per node count (300)")
    ap.add_argument(
        "--sqlite", action="store_true", help="also one node on its own SQLite spool (reference)"
    )
    ap.add_argument(
        "--worker-nice",
        type=int,
        default=10,
        help="[gateway] worker_nice of the nodes (10, the default; 0 on a machine shared with"
        " other jobs, whose share the niced worker would measure)",
    )
    ap.add_argument(
        "--worker-scheduling",
        type=common.scheduling_list,
        default=["batch"],
        help="[gateway] worker_scheduling of the nodes, comma-separated to compare in one run:"
        " batch (the default), idle, normal",
    )
    ap.add_argument(
        "--imap",
        type=int,
        default=600,
        help="mails in the IMAP backlog drained by one node with 1, then 2 worker processes"
        " (600; 0 = skip)",
    )
    ap.add_argument("--imap-runs", type=int, default=2, help="interleaved pairs (1, 2) of it")
    ap.add_argument(
        "--rate",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[0.0],
        help="mails/s the 8 senders together send at, comma-separated to compare in one run;"
        " 0 (the default) = a burst, each sender as fast as its mails are accepted",
    )
    args = ap.parse_args()
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
