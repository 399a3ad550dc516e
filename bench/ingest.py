"""Accepted mails/s over SMTP: a bare aiosmtpd sink (A) against the whole gateway daemon (B).

Run by hand (never by CI), from the repo root:

    .venv/bin/python bench/ingest.py                # 8 and 32 clients, 3 x (A, B), 3000 mails each
    .venv/bin/python bench/ingest.py --duration 10  # fixed 10 s per run instead of a count
    .venv/bin/python bench/ingest.py --spool sqlite,postgresql   # both engines, as root
    .venv/bin/python bench/ingest.py --worker-scheduling batch,idle   # the worker's policies

8 KiB mails, aiosmtplib clients, one message per connection (connect, EHLO, MAIL, RCPT, DATA,
QUIT). A = a bare aiosmtpd server that discards (its own process). B = `gateway run` with the
quick-start config (own ports, a fresh spool per run), its worker running and `gateway simulate`
answering, so every mail also becomes a ticket and an acknowledgement while the next ones arrive.
With `--spool sqlite,postgresql` there is one B per engine: SQLite (WAL, synchronous=FULL, the
default) and PostgreSQL (a private cluster started by tests/pg_server.py on 127.0.0.1, fsync on,
a fresh database per run; issue 13: >= 0.6x of A at 8 and 32 clients). Runs are interleaved
A B.. A B.. per client count; medians and the ratios B/A are reported (issue 2, SQLite: >= 0.8x
at 8 clients, >= 0.7x at 32).

Secondary figures per B run: how long the worker took after the load to ticket the backlog
(until the daemon's ticketed counter reaches the accepted count, confirmed against the
simulator's /_sim/tickets), the spool's group commit (mails per fsync of the daemon during the
load, counted with `perf stat` when available; the worker's own transactions share those fsyncs;
PostgreSQL's fsyncs are the server's: not counted),
CPU of the load generator and of the server process tree, and the daemon's peak memory.

The load generator, the server and (for B) the worker and simulators share this machine's cores:
noise between runs is 10-30 %, so only the ratio within one run means much.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common

RCPT = "support@example.com"  # routed to superoffice-soap by the demo rules
WARMUP = 20  # mails per run before the measurement (not counted)


TARGETS = {"sqlite": (0.8, 0.7), "postgresql": (0.6, 0.6)}  # B/A at <= 8 clients, above


@dataclass
class RunFigures:
    kind: str  # "A" (the sink), "B sqlite" or "B postgresql" (the daemon on that spool)
    clients: int
    run: int
    rate: float
    accepted: int
    errors: str
    gen_cpu_pct: float  # load generator CPU, % of one core
    server_cpu_pct: float  # server process tree CPU, % of one core
    peak_mib: float
    backlog_s: float | None = None  # B only: load end -> all accepted mails ticketed
    backlog_note: str = ""
    mails_per_fsync: float | None = None
    spool_rows: int | None = None


def b_kind(engine: str, scheduling: str, args: argparse.Namespace) -> str:
    """The B column's name: the engine, and the worker's policy when more than one is compared."""
    return f"B {engine}" + (f" {scheduling}" if len(args.worker_scheduling) > 1 else "")


def mail_factory(tag: str) -> common.MailFactory:
    def make(i: int) -> tuple[str, str, bytes]:
        # one customer per mail: each gets its acknowledgement (the rate limit is per sender)
        sender = f"customer-{tag}-{i}@example.org"
        return sender, RCPT, common.make_mail(sender, RCPT, f"Ingest bench {tag} #{i}")

    return make


async def load(port: int, clients: int, tag: str, args: argparse.Namespace) -> common.LoadResult:
    make = mail_factory(tag)
    await common.run_load(port, clients=clients, mail_for=lambda i: make(10**6 + i), count=WARMUP)
    return await common.run_load(
        port,
        clients=clients,
        mail_for=make,
        count=None if args.duration else args.count,
        duration=args.duration,
    )


async def run_a(root: Path, clients: int, run: int, args: argparse.Namespace) -> RunFigures:
    port = common.free_port()
    sink = common.start_sink(root, port)
    try:
        cpu0 = common.tree_cpu_seconds(sink.pid)
        res = await load(port, clients, f"a{clients}-{run}", args)
        server_cpu = common.tree_cpu_seconds(sink.pid) - cpu0
        hwm, _ = common.tree_memory_kib(sink.pid)
    finally:
        sink.stop()
    return RunFigures(
        "A",
        clients,
        run,
        res.rate,
        res.accepted,
        res.error_text(),
        100 * res.cpu / res.elapsed,
        100 * server_cpu / res.elapsed,
        hwm / 1024,
    )


async def run_b(
    root: Path,
    sim: common.SimClient,
    sim_ports: common.Ports,
    clients: int,
    run: int,
    args: argparse.Namespace,
    pg: Any = None,  # tests.pg_server.PostgresServer: the daemon's spool is a fresh database
    scheduling: str = "batch",  # [gateway] worker_scheduling
    kind: str = "",
) -> RunFigures:
    ports = common.Ports.pick(sim_ports.sim_http, sim_ports.sim_smtp)
    engine = "postgresql" if pg is not None else "sqlite"
    workdir = root / f"gw-{engine}-{scheduling}-{clients}-{run}"  # a fresh spool per run
    url = pg.new_database() if pg is not None else ""
    config = common.write_config(
        workdir,
        ports,
        {
            "ack": {"envelope_from": args.ack_envelope_from, "global_rate_limit": 0},
            "gateway": {"worker_scheduling": scheduling},
        },
        spool_url=url,
    )
    await sim.reset()
    gw = common.start_gateway(config, ports)
    tag = f"b{engine[0]}{clients}-{run}"
    try:
        # warm-up: the backend logs in, the parse process starts; wait until ticketed
        make = mail_factory(tag)
        warm = await common.run_load(
            ports.smtp, clients=clients, mail_for=lambda i: make(10**6 + i), count=WARMUP
        )

        async def warmed() -> bool:
            c = await common.gateway_counters(ports.health, ["ticketed"])
            return c["ticketed"] >= warm.accepted

        await common.wait_until(warmed, 60)
        fsyncs = common.FsyncCounter(gw.pid, workdir / "perf-fsync.csv") if not url else None
        cpu0 = common.tree_cpu_seconds(gw.pid)
        res = await common.run_load(
            ports.smtp,
            clients=clients,
            mail_for=make,
            count=None if args.duration else args.count,
            duration=args.duration,
        )
        server_cpu = common.tree_cpu_seconds(gw.pid) - cpu0
        n_fsync = fsyncs.stop() if fsyncs is not None else None
        load_end = time.monotonic()
        target = warm.accepted + res.accepted
        state: dict[str, float] = {}

        async def drained() -> bool:
            if not gw.alive():
                raise RuntimeError(f"gateway run exited during the bench:\n{gw.tail()}")
            c = await common.gateway_counters(
                ports.health, ["ticketed", "dead", "suppressed", "duplicate"]
            )
            state.update(c)
            return c["ticketed"] + c["dead"] + c["suppressed"] + c["duplicate"] >= target

        done = await common.wait_until(drained, args.backlog_timeout, interval=0.1)
        backlog = time.monotonic() - load_end if done else None
        note = ""
        if not done:
            note = f"timeout: {int(state.get('ticketed', 0))}/{target} ticketed"
        else:
            sim_count = len(await sim.tickets("superoffice-soap"))
            extra = int(state["dead"] + state["suppressed"] + state["duplicate"])
            if sim_count != target or extra:
                note = f"sim has {sim_count} tickets for {target} accepted; dead/supp./dup. {extra}"
        hwm, _ = common.tree_memory_kib(gw.pid)
    finally:
        rc = gw.stop()
    if rc not in (0, None):
        common.log(f"gateway run exited with {rc}; log {gw.log_path}")
    for err in gw.errors():
        note = f"{note}; daemon logged: {err}" if note else f"daemon logged: {err}"
    rows = pg_rows(url) if url else spool_rows(workdir / "var" / "gateway.sqlite")
    return RunFigures(
        kind or f"B {engine}",
        clients,
        run,
        res.rate,
        res.accepted,
        res.error_text(),
        100 * res.cpu / res.elapsed,
        100 * server_cpu / res.elapsed,
        hwm / 1024,
        backlog_s=backlog,
        backlog_note=note,
        mails_per_fsync=(res.accepted / n_fsync) if n_fsync else None,
        spool_rows=rows,
    )


def spool_rows(path: Path) -> int | None:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def pg_rows(url: str) -> int | None:
    import psycopg

    try:
        with psycopg.connect(url) as conn:
            row = conn.execute("SELECT COUNT(*) FROM messages").fetchone()
            return int(row[0]) if row else None
    except psycopg.Error:
        return None


def fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


async def main_async(args: argparse.Namespace) -> int:
    root = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    sim_ports = common.Ports.pick()
    common.log(f"work dir {root}; rules: rules/ of the repo")
    pg = None
    if "postgresql" in args.spool:
        sys.path.insert(0, str(common.REPO))
        from tests.pg_server import PostgresServer

        pg = PostgresServer()
        pg.start()
        common.log(f"private PostgreSQL on 127.0.0.1:{pg.port}")
    simulator = common.start_simulator(root, sim_ports)
    sim = common.SimClient(sim_ports.sim_http)
    results: list[RunFigures] = []
    variants = [(e, w) for e in args.spool for w in args.worker_scheduling]
    kinds = ["A"] + [b_kind(e, w, args) for e, w in variants]
    try:
        for clients in args.clients:
            for run in range(1, args.runs + 1):
                for kind in kinds:
                    common.log(f"{kind} clients={clients} run={run} ...")
                    if kind == "A":
                        fig = await run_a(root, clients, run, args)
                    else:
                        engine, sched = variants[kinds.index(kind) - 1]
                        on_pg = pg if engine == "postgresql" else None
                        fig = await run_b(
                            root, sim, sim_ports, clients, run, args, on_pg, sched, kind
                        )
                    common.log(f"   {fig.rate:.0f} mails/s, errors {fig.errors}")
                    results.append(fig)
    except RuntimeError as exc:
        print(f"\nbench/ingest.py: stopped: {exc}\nwork dir (logs): {root}", file=sys.stderr)
        return 1
    finally:
        await sim.aclose()
        simulator.stop()
        if pg is not None:
            pg.cleanup()

    amount = f"{args.duration:g} s" if args.duration else f"{args.count} mails"
    print(
        f"\nIngest over SMTP: 8 KiB mails, one message per connection, {amount} per run,"
        f" {WARMUP} warm-up mails not counted; A = bare aiosmtpd sink (discard),"
        " B = gateway daemon (worker + simulators running) on SQLite (WAL synchronous=FULL)"
        " or PostgreSQL (private cluster, fsync on)"
    )
    common.print_table(
        [
            "clients",
            "run",
            "kind",
            "mails/s",
            "accepted",
            "errors",
            "gen CPU%",
            "server CPU%",
            "peak MiB",
            "backlog s",
            "mails/fsync",
            "spool rows",
        ],
        [
            (
                f.clients,
                f.run,
                f.kind,
                f.rate,
                f.accepted,
                f.errors,
                f"{f.gen_cpu_pct:.0f}",
                f"{f.server_cpu_pct:.0f}",
                f"{f.peak_mib:.0f}",
                fmt(f.backlog_s) if not f.backlog_note.startswith("timeout") else "timeout",
                fmt(f.mails_per_fsync),
                "-" if f.spool_rows is None else f.spool_rows,
            )
            for f in results
        ],
        title="Per run (interleaved in the order shown)",
    )
    notes = [f"{f.kind} {f.clients}/{f.run}: {f.backlog_note}" for f in results if f.backlog_note]
    summary = []
    for clients, (engine, sched) in ((c, v) for c in args.clients for v in variants):
        kind = b_kind(engine, sched, args)
        a = [f.rate for f in results if f.clients == clients and f.kind == "A"]
        b = [f.rate for f in results if f.clients == clients and f.kind == kind]
        pairs = [fb / fa for fa, fb in zip(a, b, strict=False) if fa > 0]
        ma, mb = common.median(a), common.median(b)
        ratio = mb / ma if ma > 0 else float("nan")
        target = TARGETS[engine][0 if clients <= 8 else 1]
        backlog = [
            f.backlog_s for f in results if f.clients == clients and f.kind == kind and f.backlog_s
        ]
        per_fsync = [
            f.mails_per_fsync
            for f in results
            if f.clients == clients and f.kind == kind and f.mails_per_fsync
        ]
        summary.append(
            (
                clients,
                kind[2:],
                f"{ma:.0f}",
                f"{mb:.0f}",
                f"{ratio:.2f}x",
                f"{common.median(pairs):.2f}x",
                f">= {target}x",
                "met" if ratio >= target else "NOT met",
                fmt(common.median(backlog) if backlog else None),
                fmt(common.median(per_fsync) if per_fsync else None),
            )
        )
    common.print_table(
        [
            "clients",
            "B spool",
            "A median/s",
            "B median/s",
            "B/A (medians)",
            "B/A (median of pairs)",
            "target",
            "",
            "backlog s (median)",
            "mails/fsync (median)",
        ],
        summary,
        title=f"Summary: medians of {args.runs} interleaved runs",
    )
    print(
        "\nbacklog s = after the last 250, seconds until the worker had ticketed every accepted"
        " mail"
        " (the daemon's ticketed counter, then /_sim/tickets checked to hold exactly that many)."
        "\nmails/fsync = accepted mails / fsync+fdatasync calls of the daemon during the load"
        " (perf stat; '-' = perf unavailable); the worker's transactions share the same commits."
        "\nCPU% = % of one core during the load (2 cores = 200 %). Noise between runs is 10-30 %:"
        " compare only within one run."
    )
    for n in notes:
        print(f"note: {n}")
    print(f"work dir (logs, spools): {root}")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--spool",
        type=lambda s: [x for x in s.split(",") if x],
        default=["sqlite"],
        help="the daemon's spool engine(s), comma-separated: sqlite, postgresql (sqlite)",
    )
    p.add_argument("--count", type=int, default=3000, help="mails per run (default 3000)")
    p.add_argument(
        "--worker-scheduling",
        type=common.scheduling_list,
        default=["batch"],
        help="[gateway] worker_scheduling of B, comma-separated to compare: batch (the default),"
        " idle, normal",
    )
    p.add_argument(
        "--duration", type=float, default=None, help="seconds per run instead of --count"
    )
    p.add_argument("--backlog-timeout", type=float, default=600.0)
    p.add_argument(
        "--ack-envelope-from",
        default="",
        help='[ack] envelope_from for the daemon (default "": the null sender, as in quick start)',
    )
    args = p.parse_args()
    unknown = set(args.spool) - set(TARGETS)
    if unknown:
        p.error(f"--spool: unknown engine(s) {sorted(unknown)}; choose sqlite, postgresql")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
