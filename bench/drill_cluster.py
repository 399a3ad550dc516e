"""Issue 13's "Done when" drills at full size: several gateway nodes on one PostgreSQL spool.

Run by hand (never by CI), from the repo root, as root (the private PostgreSQL runs as
`postgres`, the private Dovecot as its mail user):

    .venv/bin/python bench/drill_cluster.py               # drills a, b, c, d
    .venv/bin/python bench/drill_cluster.py --only a,d --lease 30

Everything is a real process: one private PostgreSQL cluster (tests/pg_server.py), a fresh
`gateway simulate` and a fresh database per drill, `gateway run` nodes each with its own config
(`[gateway] node`, SMTP and health listeners on 127.0.0.2, .3, .4), and for drill c a private
Dovecot (tests/imap_server.py). A node is killed the way a power cut kills it: SIGKILL to its
whole process tree (the daemon and its worker processes at once).

a. 3 nodes, 600 mails over SMTP spread over them (paced, 8 clients; a client whose node does not
   answer, or answers 4xx, tries the next node, as an MTA tries the next MX); node n2 is SIGKILLed
   when a third of the mails are accepted and restarted once its claims were taken over. Every
   accepted mail must become exactly one ticket, two only for a mail the spool flagged uncertain
   (each one logged as event=possible_duplicate and counted in /metrics); every acknowledgement
   sent once: one message (one Message-ID) per accepted mail; a delivery repeated because the
   kill cut its record is counted and shown (the outbox is at-least-once, the repeat carries the
   same Message-ID); n2's claims taken over within lease + 5 s (measured in the spool).
b. 3 nodes, a burst of mails while PostgreSQL is stopped for 20 s: only 451s while it is down
   (no 250, no 5xx), /healthz 503 naming the spool, the refused mails retried as an MTA would;
   0 accepted mails lost, all ticketed afterwards.
c. 2 nodes, 2 [[imap]] mailboxes with a 300-mail backlog each: each mail ticketed once; the node
   holding mailbox 1 is SIGKILLed during the backlog and the other takes the mailbox over within
   lease + 5 s (the other node's /healthz stops saying "standby" for it).
d. 3 nodes, superoffice-soap with `concurrency = 4` and 200 ms per call: the simulator never sees
   more than 4 calls in flight (GET /_sim/inflight); 12 mails of one sender spread over the three
   nodes get exactly `[ack] rate_limit` (5) acknowledgements, the other 7 withheld
   (gateway_acks_withheld_total{reason="rate_sender"} summed over the nodes).

The drills use `[spool] lease = 10` (default 30; --lease) so that a takeover costs seconds, not
half a minute; the bound checked is always lease + 5 s. Backend calls are slowed in the simulator
(a: 250 ms, d: 200 ms) so that nodes hold claims when one is killed. The exit code is 0 when every
check passed. Everything binds and connects to 127.0.0.x only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import psycopg

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))
import common  # noqa: E402

from tests.imap_server import DovecotServer, make_message  # noqa: E402
from tests.pg_server import PostgresServer  # noqa: E402

LOOPBACKS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
RCPTS = ("support@example.com", "sales@example.com")  # superoffice-soap, superoffice-rest


# ---------------------------------------------------------------------------------- results


@dataclass
class Check:
    drill: str
    what: str
    ok: bool
    figures: str


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, drill: str, what: str, ok: bool, figures: str) -> None:
        c = Check(drill, what, ok, figures)
        self.checks.append(c)
        print(f"{'PASS' if ok else 'FAIL'}  {drill}. {what}: {figures}", flush=True)


# ---------------------------------------------------------------------------------- processes


class Node:
    """One `gateway run` with its own config, listening on its own loopback address."""

    def __init__(
        self,
        work: Path,
        name: str,
        host: str,
        sim: common.Ports,
        url: str,
        *,
        lease: float,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.name, self.host = name, host
        self.ports = common.Ports.pick(sim.sim_http, sim.sim_smtp)
        overrides: dict[str, Any] = {"gateway": {"node": name}, "spool": {"lease": lease}}
        common.merge(overrides, extra or {})
        self.config = common.write_config(
            work / name, self.ports, overrides, host=host, spool_url=url
        )
        self.proc: common.Proc | None = None

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.ports.health}"

    def start(self, timeout: float = 180.0) -> None:
        self.proc = common.start_gateway(self.config, self.ports, timeout, host=self.host)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.alive()

    def kill9(self) -> None:
        """SIGKILL the daemon and all its processes at once, as a power cut: the worker
        processes run in sessions of their own (a stop of the intake alone lets them drain),
        so the whole process tree, not the process group."""
        assert self.proc is not None
        for pid in common.tree_pids(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.popen.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop(60)

    def log_text(self) -> str:
        try:
            return (self.config.parent / "gateway.log").read_text(errors="replace")
        except OSError:
            return ""

    async def health(self) -> tuple[int, dict[str, Any]]:
        async with httpx.AsyncClient(timeout=15) as http:
            r = await http.get(f"{self.base}/healthz")
            return r.status_code, r.json()

    async def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels` (0 when absent or down)."""
        if not self.alive():
            return 0.0
        async with httpx.AsyncClient(timeout=15) as http:
            text = (await http.get(f"{self.base}/metrics")).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name):
                continue
            metric, _, value = line.rpartition(" ")
            if metric.split("{", 1)[0] != name:
                continue
            if all(f'{k}="{v}"' in metric for k, v in labels.items()):
                total += float(value)
        return total


class Sim:
    """A fresh `gateway simulate` for one drill."""

    def __init__(self, work: Path) -> None:
        self.ports = common.Ports.pick()
        self.proc = common.start_simulator(work, self.ports, timeout=90)
        self.base = f"http://{common.HOST}:{self.ports.sim_http}"

    async def get(self, path: str, **params: str) -> Any:
        async with httpx.AsyncClient(timeout=120) as http:
            r = await http.get(f"{self.base}{path}", params=params or None)
            r.raise_for_status()
            return r.json()

    async def fault(self, system: str, mode: str, **extra: Any) -> None:
        async with httpx.AsyncClient(timeout=30) as http:
            r = await http.post(
                f"{self.base}/_sim/fault", json={"system": system, "mode": mode, **extra}
            )
            r.raise_for_status()

    async def titles(self) -> Counter[str]:
        return Counter(t["title"] for t in await self.get("/_sim/tickets"))

    async def acks(self) -> Counter[str]:
        """Acknowledgements received by the sink, per recipient."""
        return Counter(r for m in await self.get("/_sim/outbox") for r in m["rcpt_tos"])

    async def ack_ids(self) -> dict[str, Counter[str]]:
        """recipient -> how often the sink received each acknowledgement (by its Message-ID)."""
        out: dict[str, Counter[str]] = {}
        for m in await self.get("/_sim/outbox"):
            mid = next((v for k, v in m["headers"].items() if k.lower() == "message-id"), "")
            for r in m["rcpt_tos"]:
                out.setdefault(r, Counter())[mid] += 1
        return out

    def stop(self) -> None:
        self.proc.stop()


class Db:
    """Read-only looks into the shared spool (sub-second takeover timing, final states)."""

    def __init__(self, url: str) -> None:
        self.url = url

    async def rows(self, query: str, *params: Any) -> list[tuple[Any, ...]]:
        async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
            cur = await conn.execute(query, params)  # type: ignore[arg-type]
            return await cur.fetchall()

    async def claims_of(self, node: str) -> int:
        rows = await self.rows(
            "SELECT count(*) FROM messages WHERE state = 'processing' AND claimed_by LIKE %s",
            f"{node}/%",
        )
        return int(rows[0][0])

    async def states(self) -> dict[str, int]:
        rows = await self.rows("SELECT state, count(*) FROM messages GROUP BY state")
        return {str(s): int(n) for s, n in rows}

    async def outbox_pending(self) -> int:
        rows = await self.rows("SELECT count(*) FROM outbox WHERE state = 'pending'")
        return int(rows[0][0])

    async def by_subject(self) -> dict[str, list[tuple[str, bool]]]:
        """subject -> [(state, uncertain)] of every stored copy."""
        out: dict[str, list[tuple[str, bool]]] = {}
        for subject, state, unc in await self.rows(
            "SELECT subject, state, uncertain FROM messages ORDER BY id"
        ):
            out.setdefault(str(subject), []).append((str(state), bool(unc)))
        return out


async def start_all(nodes: Sequence[Node]) -> None:
    """Start the nodes together (their migrations meet at the spool's advisory lock). When one
    fails, the others are let finish starting before the error goes on, so that the caller's
    `stop_all` finds every node that came up (a thread's start cannot be cancelled)."""
    results = await asyncio.gather(
        *(asyncio.to_thread(n.start) for n in nodes), return_exceptions=True
    )
    for r in results:
        if isinstance(r, BaseException):
            raise r


def stop_all(nodes: Sequence[Node]) -> None:
    for n in nodes:
        with contextlib.suppress(Exception):
            n.stop()


# ---------------------------------------------------------------------------------- SMTP


@dataclass
class Mail:
    i: int
    sender: str
    rcpt: str
    subject: str
    data: bytes
    accepted_by: str = ""
    accepted_at: float = 0.0
    attempts: list[tuple[float, float, str, int]] = field(
        default_factory=list
    )  # t0, t1, node, code


def make_mails(
    n: int, tag: str, drill: str, *, sender: str = "", rcpts: Sequence[str] = RCPTS
) -> list[Mail]:
    """`n` mails, each its own subject; from one sender each (60 domains: no domain limit is
    reached) unless `sender` is given, to `rcpts` in turn."""
    out = []
    for i in range(n):
        s = sender or f"c{i}@shop{i % 60}.example"
        rcpt = rcpts[i % len(rcpts)]
        subject = f"drill-{drill} {tag} mail {i}"
        out.append(Mail(i, s, rcpt, subject, common.make_mail(s, rcpt, subject, size=4096)))
    return out


async def smtp_code(host: str, port: int, mail: Mail) -> int:
    """250 when accepted, the SMTP code of a refusal, 0 when the node did not answer."""
    client = aiosmtplib.SMTP(hostname=host, port=port, timeout=60, use_tls=False, start_tls=False)
    try:
        await client.connect()
        await client.ehlo()
        await client.sendmail(mail.sender, [mail.rcpt], mail.data)
        with contextlib.suppress(Exception):
            await client.quit()
        return 250
    except aiosmtplib.SMTPRecipientsRefused as exc:
        return int(exc.recipients[0].code)
    except aiosmtplib.SMTPResponseException as exc:
        return int(exc.code)
    except (TimeoutError, aiosmtplib.SMTPException, OSError):
        return 0
    finally:
        client.close()


async def deliver(
    mails: list[Mail],
    nodes: Sequence[Node],
    *,
    clients: int = 8,
    rate: float = 0.0,
    retry_delay: float = 0.5,
    give_up: float = 180.0,
) -> None:
    """Send every mail like an MTA with several MX: its first node is i % N, a node that does
    not answer or answers 4xx is followed by the next one after `retry_delay`; 5xx is final.
    `rate` > 0 paces the first attempts (mails per second over all clients)."""
    todo: asyncio.Queue[Mail] = asyncio.Queue()
    for m in mails:
        todo.put_nowait(m)
    t0 = time.monotonic()
    started = 0

    async def client() -> None:
        nonlocal started
        while not todo.empty():
            m = todo.get_nowait()
            if rate > 0:
                started += 1
                wait = t0 + started / rate - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
            first = time.monotonic()
            k = 0
            while time.monotonic() - first < give_up:
                node = nodes[(m.i + k) % len(nodes)]
                k += 1
                a = time.monotonic()
                code = await smtp_code(node.host, node.ports.smtp, m)
                m.attempts.append((a, time.monotonic(), node.name, code))
                if code == 250:
                    m.accepted_by, m.accepted_at = node.name, time.monotonic()
                    break
                if code >= 500:
                    break
                await asyncio.sleep(retry_delay if k % len(nodes) == 0 else 0.05)

    await asyncio.gather(*(client() for _ in range(clients)))


async def until(check: Callable[[], Awaitable[bool]], within: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(Exception):
            if await check():
                return True
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(every)


async def drained(db: Db, expect: int) -> bool:
    """Every stored mail in a final state and the outbox empty."""
    states = await db.states()
    waiting = sum(states.get(s, 0) for s in ("queued", "deferred", "processing"))
    return sum(states.values()) >= expect and waiting == 0 and await db.outbox_pending() == 0


def ticket_check(
    report: Report, drill: str, subjects: list[str], titles: Counter[str], rows: dict[str, Any]
) -> tuple[int, int]:
    """One ticket per accepted mail (by subject), two only for a mail flagged uncertain;
    (doubles, missing)."""
    doubles, missing, bad = 0, 0, []
    for subject in subjects:
        n = titles[subject]
        copies = rows.get(subject, [])
        if n == 1:
            continue
        if n == 0:
            missing += 1
            bad.append(f"{subject}: no ticket, spool {copies}")
        elif n == 2 and any(unc for _, unc in copies):
            doubles += 1
        else:
            bad.append(f"{subject}: {n} tickets, spool {copies}")
    report.add(
        drill,
        "every accepted mail exactly one ticket (two only when flagged uncertain)",
        not bad,
        f"{len(subjects)} accepted, {sum(1 for x in subjects if titles[x] == 1)} with"
        f" one ticket, {doubles} with two (uncertain), {missing} with none"
        + (f"; e.g. {bad[:3]}" if bad else ""),
    )
    return doubles, missing


async def duplicates_check(
    rep: Report, drill: str, nodes: Sequence[Node], doubles: int, rows: dict[str, Any]
) -> None:
    """Every second ticket was logged (event=possible_duplicate) and counted in /metrics, and
    every uncertain mail counted (gateway_recovered_total{kind="uncertain"}, where a node took
    it over; a mail put back after a spool failure is flagged without a takeover)."""
    logged = sum(n.log_text().count("event=possible_duplicate") for n in nodes)
    counted = sum([await n.metric("gateway_possible_duplicates_total") for n in nodes])
    uncertain_rows = sum(1 for cs in rows.values() for _, unc in cs if unc)
    unc_metric = sum([await n.metric("gateway_recovered_total", kind="uncertain") for n in nodes])
    requeued = sum([await n.metric("gateway_recovered_total", kind="requeued") for n in nodes])
    rep.add(
        drill,
        "each duplicate logged (event=possible_duplicate) and counted in /metrics",
        doubles <= logged and doubles <= counted,
        f"{doubles} second tickets, {logged} possible_duplicate log lines,"
        f" gateway_possible_duplicates_total {counted:.0f}; {uncertain_rows} mails flagged"
        f" uncertain; gateway_recovered_total uncertain {unc_metric:.0f}, requeued {requeued:.0f}",
    )


def three_nodes(
    args: argparse.Namespace,
    pg: PostgresServer,
    work: Path,
    sim: Sim,
    extra: dict[str, Any] | None = None,
) -> tuple[list[Node], Db, str]:
    """Nodes n1-n3 on 127.0.0.2-.4 sharing a fresh database; that database; a tag for subjects."""
    url = pg.new_database()
    nodes = [
        Node(work, f"n{i + 1}", LOOPBACKS[i], sim.ports, url, lease=args.lease, extra=extra)
        for i in range(3)
    ]
    return nodes, Db(url), uuid.uuid4().hex[:6]


# ---------------------------------------------------------------------------------- drill a


async def drill_a(args: argparse.Namespace, pg: PostgresServer, work: Path, rep: Report) -> None:
    sim = Sim(work / "sim")
    nodes, db, tag = three_nodes(args, pg, work, sim)
    try:
        await start_all(nodes)
        for system in ("superoffice-soap", "superoffice-rest"):
            await sim.fault(system, "slow", latency_ms=args.latency)
        mails = make_mails(args.mails, tag, "a")
        victim = nodes[1]
        info: dict[str, float] = {}

        async def kill_and_restart() -> None:
            while sum(1 for m in mails if m.accepted_by) < args.mails // 3:
                await asyncio.sleep(0.05)
            victim.kill9()
            killed = time.monotonic()
            info["held"] = await db.claims_of(victim.name)
            common.log(f"a: SIGKILL {victim.name} holding {info['held']:.0f} claims")
            while await db.claims_of(victim.name) > 0:
                if time.monotonic() - killed > args.lease + 120:
                    info["took"] = float("inf")
                    break
                await asyncio.sleep(0.2)
            else:
                info["took"] = time.monotonic() - killed
            common.log(f"a: claims of {victim.name} taken over after {info['took']:.1f} s")
            t = time.monotonic()
            await asyncio.to_thread(victim.start)
            info["restart_s"] = time.monotonic() - t
            info["restarted_at"] = time.monotonic()
            common.log(f"a: {victim.name} restarted ({info['restart_s']:.1f} s to /healthz 200)")

        killer = asyncio.create_task(kill_and_restart())
        t0 = time.monotonic()
        await deliver(mails, nodes, clients=8, rate=args.rate)
        common.log(f"a: sending done in {time.monotonic() - t0:.1f} s")
        await killer
        accepted = [m for m in mails if m.accepted_by]
        stored = await until(lambda: drained(db, len(accepted)), 600, 1.0)
        await asyncio.sleep(2)  # the last acknowledgements reach the sink
        titles, rows, acks = await sim.titles(), await db.by_subject(), await sim.ack_ids()
        per_node = Counter(m.accepted_by for m in accepted)
        refused = Counter(c for m in mails for _, _, _, c in m.attempts if c != 250)
        rep.add(
            "a",
            "every mail accepted by some node (no 5xx), spool drained",
            len(accepted) == len(mails) and stored and not any(c >= 500 for c in refused),
            f"{len(accepted)}/{len(mails)} accepted ({dict(sorted(per_node.items()))}),"
            f" attempts refused or unanswered {dict(refused)}, final states {await db.states()}",
        )
        doubles, _ = ticket_check(rep, "a", [m.subject for m in accepted], titles, rows)
        await duplicates_check(rep, "a", nodes, doubles, rows)
        senders = {m.sender for m in accepted}
        wrong = {r: dict(c) for r, c in acks.items() if r in senders and len(c) != 1}
        missing = [r for r in senders if r not in acks]
        stray = [r for r in acks if r not in senders]
        again = {r: dict(c) for r, c in acks.items() if any(n > 1 for n in c.values())}
        rep.add(
            "a",
            "every acknowledgement sent once (one message, one Message-ID, per accepted mail)",
            not wrong and not missing and not stray,
            f"{sum(len(c) for c in acks.values())} acknowledgements for {len(senders)} senders,"
            f" {sum(sum(c.values()) for c in acks.values())} deliveries to the sink; senders"
            f" with no ack {len(missing)}, with two different acks {len(wrong)}; the same ack"
            f" delivered twice (its record cut by the SIGKILL between the relay's 250 and the"
            f" spool, resent by the node that took it over, same Message-ID): {len(again)}"
            + (f" {list(again.items())[:2]}" if again else ""),
        )
        took = info.get("took", float("inf"))
        back = info.get("restarted_at", float("inf"))
        again = sum(1 for m in accepted if m.accepted_by == victim.name and m.accepted_at > back)
        rep.add(
            "a",
            f"the killed node's claims taken over within lease + 5 s ({args.lease + 5:.0f} s)",
            took <= args.lease + 5 and info.get("held", 0) > 0,
            f"{victim.name} held {info.get('held', 0):.0f} claims at SIGKILL; all taken over after"
            f" {took:.1f} s (lease {args.lease:.0f} s); restarted in"
            f" {info.get('restart_s', float('nan')):.1f} s, then accepted {again} mails",
        )
    finally:
        stop_all(nodes)
        sim.stop()


# ---------------------------------------------------------------------------------- drill b


async def drill_b(args: argparse.Namespace, pg: PostgresServer, work: Path, rep: Report) -> None:
    sim = Sim(work / "sim")
    nodes, db, tag = three_nodes(args, pg, work, sim)
    try:
        await start_all(nodes)
        before, outage = 8.0, args.outage
        count = int(args.burst_rate * (before + outage + 12))
        mails = make_mails(count, tag, "b")
        marks: dict[str, float] = {}
        health: list[tuple[str, int, list[str]]] = []

        async def outage_task() -> None:
            await asyncio.sleep(before)
            marks["stop0"] = time.monotonic()
            await asyncio.to_thread(pg.stop)
            marks["stop1"] = time.monotonic()
            common.log(f"b: PostgreSQL stopped ({marks['stop1'] - marks['stop0']:.1f} s)")
            await asyncio.sleep(outage / 2)
            for n in nodes:
                with contextlib.suppress(Exception):
                    code, body = await n.health()
                    health.append((n.name, code, body.get("problems", [])))
            await asyncio.sleep(max(0.0, marks["stop1"] + outage - time.monotonic()))
            marks["start0"] = time.monotonic()
            await asyncio.to_thread(pg.start)
            marks["start1"] = time.monotonic()
            common.log(f"b: PostgreSQL started ({marks['start1'] - marks['start0']:.1f} s)")

        task = asyncio.create_task(outage_task())
        await deliver(mails, nodes, clients=8, rate=args.burst_rate, retry_delay=1.0, give_up=300)
        await task
        attempts = [a for m in mails for a in m.attempts]
        down = [a for a in attempts if a[0] >= marks["stop1"] and a[1] <= marks["start0"]]
        codes_down = Counter(c for *_, c in down)
        refused_s = [t1 - t0 for t0, t1, _, c in down if c == 451]
        rep.add(
            "b",
            f"PostgreSQL down {marks['start0'] - marks['stop1']:.0f} s: only 451 meanwhile",
            codes_down.get(451, 0) > 0 and set(codes_down) <= {451},
            f"answers to sessions inside the outage: {dict(codes_down)}"
            f" (250 = accepted uncommitted, must be 0); a 451 took"
            f" {sum(refused_s) / max(1, len(refused_s)):.1f} s on average",
        )
        rep.add(
            "b",
            "/healthz 503 naming the spool during the outage",
            len(health) == len(nodes)
            and all(
                code == 503 and any(p.startswith("spool") for p in pr) for _, code, pr in health
            ),
            "; ".join(f"{n} {code} {pr[:1]}" for n, code, pr in health),
        )
        after = [m.accepted_at - marks["start1"] for m in mails if m.accepted_at > marks["start1"]]
        accepted = [m for m in mails if m.accepted_by]
        all_codes = Counter(c for *_, c in attempts)
        stored = await until(lambda: drained(db, len(accepted)), 600, 1.0)
        titles, rows = await sim.titles(), await db.by_subject()
        rep.add(
            "b",
            "every mail accepted in the end (451s retried as an MTA would), spool drained",
            len(accepted) == len(mails) and stored and not any(c >= 500 for c in all_codes),
            f"{len(accepted)}/{len(mails)} accepted; all answers {dict(all_codes)}; first 250"
            f" {min(after) if after else float('nan'):.1f} s after PostgreSQL was back;"
            f" final states {await db.states()}",
        )
        doubles, _ = ticket_check(rep, "b", [m.subject for m in accepted], titles, rows)
        await duplicates_check(rep, "b", nodes, doubles, rows)
    finally:
        stop_all(nodes)
        sim.stop()
        if not pg.running:
            pg.start()


# ---------------------------------------------------------------------------------- drill c


async def drill_c(args: argparse.Namespace, pg: PostgresServer, work: Path, rep: Report) -> None:
    url, tag = pg.new_database(), uuid.uuid4().hex[:6]
    dovecot = DovecotServer.create()
    sim: Sim | None = None
    nodes: list[Node] = []
    try:
        boxes = [dovecot.add_mailbox(f"box{b}@example.com") for b in (1, 2)]
        subjects = []
        for b, box in enumerate(boxes, 1):
            subj = [f"drill-c {tag} box{b} mail {k}" for k in range(args.backlog)]
            box.append(
                make_message(b * 100000 + k, subject=s, size=2048) for k, s in enumerate(subj)
            )
            subjects += subj
        common.log(f"c: {args.backlog} mails in each of 2 mailboxes")
        sim = Sim(work / "sim")
        imap = [
            {
                "name": f"box{b}",
                "host": "127.0.0.1",
                "port": dovecot.port,
                "security": "plain",
                "username": box.username,
                "password": box.password,
                "after": "delete",
                "poll_interval": 1,
            }
            for b, box in enumerate(boxes, 1)
        ]
        await sim.fault("superoffice-soap", "slow", latency_ms=20)
        nodes = [
            Node(work, name, LOOPBACKS[i], sim.ports, url, lease=args.lease, extra={"imap": imap})
            for i, name in enumerate(("alpha", "beta"))
        ]
        await start_all(nodes)

        async def holder(box: str) -> Node | None:
            for n in nodes:
                _, body = await n.health()
                detail = body["components"].get(f"intake:imap:{box}", {}).get("detail", "")
                if "standby" not in detail:
                    return n
            return None

        owner: Node | None = None

        async def known() -> bool:
            nonlocal owner
            owner = await holder("box1")
            return owner is not None

        await until(known, 60, 0.2)
        assert owner is not None, "no node polls box1"
        other = nodes[1 - nodes.index(owner)]

        async def started() -> bool:
            """The holder is working through box1: part of it fetched, or tickets made."""
            if boxes[0].count("INBOX") < args.backlog * 0.8:
                return True
            t = await sim.titles()
            return sum(1 for s in subjects[: args.backlog] if t[s]) >= args.backlog // 6

        await until(started, 120, 0.2)
        left = boxes[0].count("INBOX")
        owner.kill9()
        killed = time.monotonic()
        common.log(f"c: SIGKILL {owner.name} (held box1, {left} mails left in its INBOX)")

        async def taken() -> bool:
            _, body = await other.health()
            return "standby" not in body["components"]["intake:imap:box1"].get("detail", "")

        # new mail while the holder is dead: only the node that takes box1 over can ticket it
        late = [f"drill-c {tag} box1 after kill {k}" for k in range(20)]
        boxes[0].append(make_message(900000 + k, subject=s, size=2048) for k, s in enumerate(late))
        took = time.monotonic() - killed if await until(taken, args.lease + 60, 0.2) else None
        subjects += late
        done = await until(lambda: _all_ticketed(sim, subjects), 600, 1.0)
        await asyncio.sleep(2)
        titles, rows = await sim.titles(), await Db(url).by_subject()
        counts = Counter(titles[s] for s in subjects)
        rep.add(
            "c",
            "every IMAP mail fetched and ticketed, mailboxes emptied",
            done and boxes[0].count("INBOX") == 0 and boxes[1].count("INBOX") == 0,
            f"{len(subjects)} mails in 2 mailboxes ({args.backlog} each + 20 after the kill):"
            f" tickets per mail {dict(counts)};"
            f" INBOX left: box1 {boxes[0].count('INBOX')}, box2 {boxes[1].count('INBOX')}",
        )
        doubles, _ = ticket_check(rep, "c", subjects, titles, rows)
        await duplicates_check(rep, "c", nodes, doubles, rows)
        rep.add(
            "c",
            f"mailbox taken over within lease + 5 s ({args.lease + 5:.0f} s)",
            took is not None and took <= args.lease + 5 and all(titles[x] == 1 for x in late),
            f"{owner.name} SIGKILLed with {left} mails left in box1 (20 more put in after the"
            f" kill); {other.name} polled it after"
            f" {took if took is not None else float('inf'):.1f} s and ticketed the 20:"
            f" {sum(1 for x in late if titles[x] == 1)}/20",
        )
    finally:
        stop_all(nodes)
        if sim is not None:
            sim.stop()
        dovecot.cleanup()


async def _all_ticketed(sim: Sim, subjects: list[str]) -> bool:
    t = await sim.titles()
    return all(t[s] for s in subjects)


# ---------------------------------------------------------------------------------- drill d


async def drill_d(args: argparse.Namespace, pg: PostgresServer, work: Path, rep: Report) -> None:
    sim = Sim(work / "sim")
    extra = {"backends": {"superoffice-soap": {"concurrency": 4}}}
    nodes, db, tag = three_nodes(args, pg, work, sim, extra)
    try:
        await start_all(nodes)
        await sim.fault("superoffice-soap", "slow", latency_ms=200)
        same = "same.sender@drill-d.example"
        soap = ("support@example.com",)
        many = make_mails(60, tag, "d", rcpts=soap)
        one = make_mails(12, tag + "s", "d", sender=same, rcpts=soap)
        mails = many + one
        for i, m in enumerate(mails):
            m.i = i  # spread over the three nodes
        await deliver(mails, nodes, clients=12)
        accepted = [m for m in mails if m.accepted_by]
        await until(lambda: drained(db, len(accepted)), 600, 1.0)
        await asyncio.sleep(2)
        inflight = (await sim.get("/_sim/inflight"))["superoffice-soap"]
        rep.add(
            "d",
            "concurrency = 4 holds across 3 nodes",
            1 <= inflight["max"] <= 4,
            f"{len(accepted)} mails to superoffice-soap (2 calls each, 200 ms) from 3 nodes:"
            f" at most {inflight['max']} calls in flight at once (simulator)",
        )
        titles, rows = await sim.titles(), await db.by_subject()
        ticket_check(rep, "d", [m.subject for m in accepted], titles, rows)
        acks = (await sim.acks())[same]
        withheld = sum(
            [await n.metric("gateway_acks_withheld_total", reason="rate_sender") for n in nodes]
        )
        by_node = Counter(m.accepted_by for m in one)
        rep.add(
            "d",
            "per-sender ack limit (rate_limit = 5) counts across nodes",
            acks == 5 and withheld == len(one) - 5,
            f"{len(one)} mails of one sender accepted by {dict(sorted(by_node.items()))}:"
            f" {acks} acks sent, {withheld:.0f} withheld (rate_sender, summed over the nodes)",
        )
    finally:
        stop_all(nodes)
        sim.stop()


# ---------------------------------------------------------------------------------- main

DRILLS = {"a": drill_a, "b": drill_b, "c": drill_c, "d": drill_d}


async def main_async(args: argparse.Namespace) -> int:
    for host in LOOPBACKS:  # 127.0.0.0/8 is loopback on Linux; make sure before starting
        with socket.socket() as s:
            s.bind((host, 0))
    work = Path(tempfile.mkdtemp(prefix="drill-cluster-"))
    common.log(f"work directory {work}")
    pg = PostgresServer()
    pg.start()
    rep = Report()
    try:
        for name in args.only:
            common.log(f"drill {name} ...")
            t = time.monotonic()
            try:
                await DRILLS[name](args, pg, work / name, rep)
            except Exception as exc:  # a drill that cannot finish is a failed drill
                rep.add(name, "drill ran to the end", False, f"{type(exc).__name__}: {exc}")
            common.log(f"drill {name}: {time.monotonic() - t:.0f} s")
    finally:
        pg.cleanup()
    failed = [c for c in rep.checks if not c.ok]
    print(
        f"\n{len(rep.checks) - len(failed)}/{len(rep.checks)} checks passed"
        f" (lease {args.lease:g} s; load {os.getloadavg()[0]:.1f}); logs in {work}"
    )
    return 1 if failed else 0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default="a,b,c,d")
    ap.add_argument("--lease", type=float, default=10.0, help="[spool] lease of the nodes (10)")
    ap.add_argument("--mails", type=int, default=600, help="drill a: mails (600)")
    ap.add_argument("--rate", type=float, default=10.0, help="drill a: mails/s offered (10)")
    ap.add_argument(
        "--latency", type=int, default=250, help="drill a: ms per simulated backend call (250)"
    )
    ap.add_argument("--outage", type=float, default=20.0, help="drill b: seconds down (20)")
    ap.add_argument("--burst-rate", type=float, default=15.0, help="drill b: mails/s (15)")
    ap.add_argument("--backlog", type=int, default=300, help="drill c: mails per mailbox (300)")
    args = ap.parse_args()
    if isinstance(args.only, str):
        args.only = args.only.split(",")
    unknown = [x for x in args.only if x not in DRILLS]
    if unknown:
        ap.error(f"unknown drill(s) {unknown}: choose from a, b, c, d")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
