"""Several nodes on one PostgreSQL spool: tickets/s as a share of the latency bound, per node count.

Run by hand (never by CI), from the repo root, as root (the private PostgreSQL runs as `postgres`):

    .venv/bin/python bench/cluster.py                  # 1, 2 and 3 nodes, 300 mails each
    .venv/bin/python bench/cluster.py --nodes 1,3 --count 400

For each node count N: a fresh database in a private PostgreSQL cluster (tests/pg_server.py), a
fresh `gateway simulate`, and N `gateway run` processes sharing that database, each with its own
SMTP and health ports (`[gateway] node = "nI"`). Every simulated call is answered 100 ms late;
superoffice-soap (support@: newTicket + addMessage = 2 calls per ticket) has `concurrency = 8`,
which the gateway holds for the whole cluster. After a warm-up mail per node (sessions cached),
`--count` mails are sent over SMTP by 8 concurrent clients, spread round-robin over the nodes; the
clock runs from the first 250 to the moment the simulator holds all tickets with their message.

The latency bound is concurrency / (calls per ticket x latency) = 8 / 0.2 s = 40 tickets/s,
whatever the node count: adding nodes must cost nothing (target >= 0.8 of the bound for every N).
The simulator's /_sim/inflight shows the most calls it saw at once (must stay <= 8). Everything
(nodes, PostgreSQL, simulator, load) shares this machine's cores; noise is 10-30 % between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common

from tests.pg_server import PostgresServer

LATENCY_MS = 100
LIMIT = 8
CALLS = 2  # superoffice-soap: newTicket + addMessage


def node_config(work: Path, name: str, ports: common.Ports, url: str) -> Path:
    cfg = common.write_config(
        work / name,
        ports,
        {
            "gateway": {"node": name, "workers": 16},
            "backends": {"superoffice-soap": {"concurrency": LIMIT}},
        },
    )
    text = cfg.read_text()
    text, n = re.subn(r'(?m)^path = "var/gateway.sqlite"$', f'url = "{url}"', text)
    assert n == 1, "no [spool] path in the written config"
    cfg.write_text(text)
    return cfg


async def send_all(ports: list[int], count: int, tag: str, clients: int = 8) -> float:
    """Send `count` mails round-robin over `ports` with `clients` senders; time of the first 250."""
    first: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(count):
        queue.put_nowait(i)

    async def sender() -> None:
        while not queue.empty():
            i = queue.get_nowait()
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

    await asyncio.gather(*(sender() for _ in range(clients)))
    return first[0]


async def tickets_done(sim: common.SimClient, tag: str, count: int) -> bool:
    calls = await sim.calls()
    if calls.get("superoffice-soap", 0) < CALLS * count:
        return False
    found = [t for t in await sim.tickets("superoffice-soap") if t["title"].startswith(tag)]
    return len(found) >= count and all(t["messages"] for t in found)


async def run_nodes(pg: PostgresServer, work: Path, n: int, count: int) -> dict[str, float]:
    url = pg.new_database()
    sim_ports = common.Ports.pick()
    sim_proc = common.start_simulator(work / f"sim{n}", sim_ports)
    nodes: list[tuple[common.Proc, common.Ports]] = []
    sim = common.SimClient(sim_ports.sim_http)
    try:
        for i in range(n):
            ports = common.Ports.pick(sim_ports.sim_http, sim_ports.sim_smtp)
            cfg = node_config(work / f"n{n}", f"n{i + 1}", ports, url)
            nodes.append((common.start_gateway(cfg, ports, timeout=120), ports))
        await sim.fault("superoffice-soap", "slow", latency_ms=LATENCY_MS)
        smtp = [p.smtp for _, p in nodes]
        await send_all(smtp, len(smtp), "warmup", clients=len(smtp))
        if not await common.wait_until(lambda: tickets_done(sim, "warmup", len(smtp)), 120):
            raise RuntimeError("warm-up mails were not ticketed")
        start = await send_all(smtp, count, "burst")
        ok = await common.wait_until(lambda: tickets_done(sim, "burst", count), 600, 0.1)
        elapsed = time.monotonic() - start
        if not ok:
            raise RuntimeError(f"{n} nodes: not all {count} tickets within 600 s")
        async with httpx.AsyncClient(timeout=10) as http:
            inflight = (await http.get(f"{sim.base}/_sim/inflight")).json()["superoffice-soap"]
        rate = count / elapsed
        bound = LIMIT / (CALLS * LATENCY_MS / 1000)
        return {"tickets_s": rate, "bound": bound, "share": rate / bound, "max": inflight["max"]}
    finally:
        await sim.aclose()
        for proc, _ in nodes:
            proc.stop()
        sim_proc.stop()


async def main_async(args: argparse.Namespace) -> int:
    pg = PostgresServer()
    pg.start()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
            for n in args.nodes:
                common.log(f"{n} node(s): {args.count} mails")
                r = await run_nodes(pg, Path(tmp), n, args.count)
                common.log(
                    f"{n} node(s): {r['tickets_s']:.1f} tickets/s = {r['share']:.2f} of bound"
                )
                rows.append(
                    [
                        str(n),
                        str(args.count),
                        f"{r['tickets_s']:.1f}",
                        f"{r['bound']:.0f}",
                        f"{r['share']:.2f}",
                        ">= 0.80",
                        str(int(r["max"])),
                    ]
                )
    finally:
        pg.cleanup()
    common.print_table(
        ["nodes", "mails", "tickets/s", "bound/s", "x bound", "target", "max calls in flight"],
        rows,
    )
    print(
        f"\nbound = concurrency {LIMIT} / ({CALLS} calls x {LATENCY_MS} ms), held cluster-wide;"
        " max calls in flight as the simulator counted them (limit 8)."
    )
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--nodes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 3])
    ap.add_argument("--count", type=int, default=300, help="mails per node count (300)")
    return asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    raise SystemExit(main())
