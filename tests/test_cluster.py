"""Several gateway nodes on one PostgreSQL spool, as real `gateway run` processes.

- A node killed with SIGKILL while it holds claims: another node takes them over within the
  lease (+ 5 s), every accepted mail becomes one ticket (a second one only for a mail flagged
  uncertain), and /healthz names the nodes alive.
- A backend's `concurrency` holds for the cluster: the simulator counts the calls in flight; the
  per-sender acknowledgement limit counts every node's acknowledgements.
- PostgreSQL stopped: SMTP answers 451 and /healthz 503 naming the spool; everything resumes by
  itself when the server is back, nothing accepted is lost.
"""

from __future__ import annotations

import contextlib
import json
import smtplib
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from tests.harness import DaemonProcess, SimProcess, wait_for, write_config
from tests.pg_server import PostgresServer

LEASE = 4


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimProcess]:
    s = SimProcess(tmp_path / "sim")
    s.start(timeout=90)  # several daemons and a database share the machine
    yield s
    s.stop()


class Cluster:
    def __init__(self, tmp: Path, sim: SimProcess, url: str) -> None:
        self.tmp, self.sim, self.url = tmp, sim, url
        self.nodes: dict[str, DaemonProcess] = {}

    def node(
        self, name: str, *, concurrency: int | None = None, lease: int = LEASE
    ) -> DaemonProcess:
        replace = {
            'path = "var/gateway.sqlite"        #': '# path = "var/gateway.sqlite"  #',
            '# url = "postgresql://gateway@db.example.com:5432/gateway"': f'url = "{self.url}"',
            'node = ""': f'node = "{name}"',
            "lease = 30 ": f"lease = {lease} ",
        }
        if concurrency is not None:
            replace["[backends.superoffice-soap]\n"] = (
                f"[backends.superoffice-soap]\nconcurrency = {concurrency}\n"
            )
        cfg = write_config(
            self.tmp / name,
            sim_http=self.sim.http_port,
            sim_smtp=self.sim.smtp_port,
            replace=replace,
        )
        d = DaemonProcess(cfg)
        self.nodes[name] = d
        return d

    def stop(self) -> None:
        for d in self.nodes.values():
            if d.proc is not None and d.proc.poll() is None:
                d.stop(60)


@pytest.fixture
def cluster(tmp_path: Path, sim: SimProcess, pg: PostgresServer) -> Iterator[Cluster]:
    c = Cluster(tmp_path, sim, pg.new_database())
    yield c
    c.stop()


def _message(subject: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "cluster@example.org"
    msg["To"] = "support@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@example.org>"
    msg.set_content("cluster test")
    return msg


def send(port: int, subject: str) -> int:
    """The SMTP reply code for one mail (250 accepted, 451 refused for now)."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.send_message(_message(subject))
        return 250
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code
    except smtplib.SMTPRecipientsRefused as exc:
        return next(iter(exc.recipients.values()))[0]


def health(d: DaemonProcess) -> tuple[int, dict]:  # type: ignore[type-arg]
    r = httpx.get(f"http://127.0.0.1:{d.health_port}/healthz", timeout=15)
    return r.status_code, r.json()


def titles(sim: SimProcess) -> Counter[str]:
    return Counter(t["title"] for t in sim.get("/_sim/tickets"))


def counter(d: DaemonProcess, name: str, labels: str = "") -> float:
    """The value of a /metrics sample `name{...labels...}` of node `d` (0 when absent)."""
    text = httpx.get(f"http://127.0.0.1:{d.health_port}/metrics", timeout=15).text
    for line in text.splitlines():
        metric, _, value = line.rpartition(" ")
        if metric.split("{", 1)[0] == name and labels in metric:
            return float(value)
    return 0.0


def log_time(d: DaemonProcess, text: str) -> float:
    """The time of the first line of the node's log that holds `text` (whole seconds)."""
    line = next(x for x in d.log.read_text().splitlines() if text in x)
    return datetime.strptime(line.split()[0], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def queue(d: DaemonProcess, *args: str) -> list[dict]:  # type: ignore[type-arg]
    res = d.gateway("queue", "-c", str(d.config), "ls", "--json", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def test_a_killed_nodes_claims_are_taken_over(cluster: Cluster, sim: SimProcess) -> None:
    a, b = cluster.node("alpha"), cluster.node("beta")
    a.start(timeout=90)
    b.start(timeout=90)
    both = wait_for(lambda: health(b)[1]["spool"].get("nodes") == ["alpha", "beta"], 30)
    assert both, health(b)
    _, body = health(a)
    assert body["node"] == "alpha" and body["spool"]["engine"] == "postgresql"

    # slow calls: mails stay in hand long enough to kill a node holding some
    # (long enough that a loaded machine's slow `gateway queue` still sees them in hand)
    sim.post("/_sim/fault", {"system": "superoffice-soap", "mode": "slow", "latency_ms": 15000})
    subjects = [f"takeover {i}" for i in range(16)]
    for i, s in enumerate(subjects):
        assert send((a if i % 2 else b).smtp_port, s) == 250
    held = wait_for(
        lambda: [r for r in queue(b, "--state", "processing") if r["claimed_by"] == "alpha/0"], 60
    )
    assert held, queue(b)
    a.kill9()
    killed = time.time()

    def taken_over() -> bool:
        return not any(
            r["claimed_by"].startswith("alpha/") for r in queue(b, "--state", "processing")
        )

    assert wait_for(taken_over, LEASE + 60), queue(b)
    # when beta put alpha's mails back, by its own log (the queue command's start-up under a
    # loaded machine is not part of the takeover)
    took = log_time(b, "event=claims_taken_over") - killed
    assert took <= LEASE + 5 + 1, f"took {took:.1f} s"  # + 1: the log's whole seconds
    sim.post("/_sim/fault", {"system": "superoffice-soap", "mode": "ok"})
    assert wait_for(lambda: all(titles(sim)[s] >= 1 for s in subjects), 120), titles(sim)
    # a ticket is there at newTicket; its mail is done once addMessage and the outcome are
    assert wait_for(lambda: {r["state"] for r in queue(b)} == {"done"}, 120), queue(b)
    rows = {r["subject"]: r for r in queue(b)}
    counts = titles(sim)
    for s in subjects:
        # one ticket each; a second only for a mail whose create call was in flight at the kill
        assert counts[s] == 1 or (counts[s] == 2 and rows[s]["uncertain"]), (s, counts[s], rows[s])
    assert {r["state"] for r in rows.values()} == {"done"}
    assert "claims_taken_over" in b.log.read_text()
    metrics = httpx.get(f"http://127.0.0.1:{b.health_port}/metrics", timeout=15).text
    requeued = [
        x for x in metrics.splitlines() if x.startswith('gateway_recovered_total{kind="requeued"}')
    ]
    # at least one: some of the mails seen in alpha's hand may have finished before the kill
    assert requeued and float(requeued[0].split()[-1]) >= 1, metrics[-2000:]
    uncertain_rows = [r for r in rows.values() if r["uncertain"]]
    unc = [
        x for x in metrics.splitlines() if x.startswith('gateway_recovered_total{kind="uncertain"}')
    ]
    assert unc and float(unc[0].split()[-1]) >= len(uncertain_rows)
    # the dead node drops out of the nodes alive
    assert wait_for(lambda: health(b)[1]["spool"]["nodes"] == ["beta"], LEASE + 10), health(b)


def test_backend_concurrency_and_ack_limit_hold_across_nodes(
    cluster: Cluster, sim: SimProcess
) -> None:
    nodes = [cluster.node(n, concurrency=2) for n in ("n1", "n2", "n3")]
    for d in nodes:
        d.start(timeout=90)
    sim.post("/_sim/fault", {"system": "superoffice-soap", "mode": "slow", "latency_ms": 400})
    subjects = [f"limit {i}" for i in range(24)]
    for i, s in enumerate(subjects):
        assert send(nodes[i % 3].smtp_port, s) == 250
    assert wait_for(lambda: all(titles(sim)[s] >= 1 for s in subjects), 180), titles(sim)
    inflight = httpx.get(f"{sim.url}/_sim/inflight", timeout=10).json()["superoffice-soap"]
    # newTicket and addMessage are two calls of one mail, one after the other: at most 2 at once
    assert 1 <= inflight["max"] <= 2, inflight
    assert all(titles(sim)[s] == 1 for s in subjects)

    # The per-sender acknowledgement limit ([ack] rate_limit = 5 an hour) counts across nodes:
    # the 24 mails are all from one sender, 8 accepted by each node: 5 acks in all, 19 withheld.
    def withheld() -> float:
        return sum(counter(d, "gateway_acks_withheld_total", 'reason="rate_sender"') for d in nodes)

    assert wait_for(lambda: withheld() == len(subjects) - 5, 60), withheld()

    def acks() -> int:
        return sum("cluster@example.org" in m["rcpt_tos"] for m in sim.get("/_sim/outbox"))

    assert wait_for(lambda: acks() >= 5, 60), acks()
    time.sleep(1)  # an ack over the limit would be on its way by now
    assert acks() == 5


@contextlib.contextmanager
def node_on_own_server(
    tmp_path: Path, sim: SimProcess
) -> Iterator[tuple[PostgresServer, DaemonProcess]]:
    """One node on a PostgreSQL cluster of its own (the test stops and starts it), with the
    default lease: a mail in flight when PostgreSQL stops stays this node's claim through the
    outage (with a lease shorter than the outage it would be put back uncertain)."""
    server = PostgresServer()
    server.start()
    try:
        d = Cluster(tmp_path, sim, server.new_database()).node("solo", lease=30)
        d.start(timeout=90)
        try:
            yield server, d
        finally:
            d.stop(60)
    finally:
        server.cleanup()


def test_postgresql_outage_451_then_resumes(tmp_path: Path, sim: SimProcess) -> None:
    with node_on_own_server(tmp_path, sim) as (server, d):
        assert send(d.smtp_port, "before outage") == 250
        server.stop()
        assert send(d.smtp_port, "during outage") == 451  # nothing accepted uncommitted
        code, body = health(d)
        assert code == 503 and any(p.startswith("spool:") for p in body["problems"]), body
        assert body["spool"]["ok"] is False
        server.start()
        assert wait_for(lambda: health(d)[0] == 200, 60), health(d)
        assert send(d.smtp_port, "after outage") == 250
        want = ["before outage", "after outage"]
        assert wait_for(lambda: all(titles(sim)[s] == 1 for s in want), 60), titles(sim)
        assert titles(sim)["during outage"] == 0


def test_a_ticket_created_while_postgresql_is_down_is_not_created_twice(
    tmp_path: Path, sim: SimProcess
) -> None:
    """newTicket is answered while the spool is away: the worker keeps the ticket id and records
    it once PostgreSQL is back (within the claim's lease), then adds the message to that ticket.
    Put back without it, the mail would be flagged uncertain and become a second ticket."""
    with node_on_own_server(tmp_path, sim) as (server, d):
        assert send(d.smtp_port, "warm up") == 250  # the SOAP session is made
        assert wait_for(lambda: titles(sim)["warm up"] == 1, 60), titles(sim)
        sim.post("/_sim/fault", {"system": "superoffice-soap", "mode": "slow", "latency_ms": 4000})
        assert send(d.smtp_port, "answered during the outage") == 250
        assert wait_for(lambda: sim.get("/_sim/inflight")["superoffice-soap"]["now"] >= 1, 30)
        server.stop()  # newTicket is answered ~4 s after it was sent: the spool is away
        time.sleep(12)  # longer than a pooled connection is waited for: the write fails
        server.start()
        sim.post("/_sim/fault", {"system": "superoffice-soap", "mode": "ok"})
        subject = "answered during the outage"

        def both_done() -> bool:
            return [r["state"] for r in queue(d)] == ["done", "done"]

        assert wait_for(both_done, 90), (titles(sim), queue(d))
        time.sleep(2)
        assert titles(sim)[subject] == 1
        (ticket,) = [t for t in sim.get("/_sim/tickets") if t["title"] == subject]
        assert len(ticket["messages"]) == 1  # addMessage went to the ticket it made
        assert "event=progress_write_retrying" in d.log.read_text()  # the outage was hit


def test_an_imap_mailbox_is_polled_by_one_node_and_taken_over(
    cluster: Cluster, sim: SimProcess
) -> None:
    from tests.imap_server import DovecotServer, DovecotUnavailable, make_message

    try:
        dovecot = DovecotServer.create()
    except DovecotUnavailable as exc:
        pytest.fail(f"Dovecot is required for this test: {exc}")
    try:
        boxes = [dovecot.add_mailbox(f"box{i}@example.com") for i in (1, 2)]
        extra = "".join(
            f'\n[[imap]]\nname = "box{i}"\nhost = "127.0.0.1"\nport = {mb.server.port}\n'
            f'security = "plain"\nusername = "{mb.username}"\npassword = "{mb.password}"\n'
            'after = "delete"\npoll_interval = 1\n'
            for i, mb in enumerate(boxes, 1)
        )
        nodes = []
        for name in ("alpha", "beta"):
            d = cluster.node(name)
            d.config.write_text(d.config.read_text() + extra)
            nodes.append(d)
        per_box = 40
        for i, mb in enumerate(boxes):
            mb.append(make_message(i * 1000 + n, subject=f"imap {i} {n}") for n in range(per_box))
        for d in nodes:
            d.start(timeout=90)
        subjects = [f"imap {i} {n}" for i in range(2) for n in range(per_box)]
        assert wait_for(lambda: all(titles(sim)[s] >= 1 for s in subjects), 180), titles(sim)
        counts = titles(sim)
        assert all(counts[s] == 1 for s in subjects), counts  # each mail ticketed once

        def holder(box: str) -> DaemonProcess | None:
            for d in nodes:
                detail = health(d)[1]["components"][f"intake:imap:{box}"].get("detail", "")
                if "standby" not in detail:
                    return d
            return None

        owner = holder("box1")
        assert owner is not None
        other = nodes[1 - nodes.index(owner)]
        assert "standby" in health(other)[1]["components"]["intake:imap:box1"]["detail"]
        owner.kill9()
        killed = time.time()
        boxes[0].append([make_message(5000, subject="imap after kill")])
        assert wait_for(lambda: titles(sim)["imap after kill"] == 1, LEASE + 60), titles(sim)
        other_name = next(n for n, d in cluster.nodes.items() if d is other)
        took = log_time(other, f"imap_lease_taken mailbox=box1 node={other_name}") - killed
        assert took <= LEASE + 5 + 1, f"took {took:.1f} s"  # + 1: the log's whole seconds
    finally:
        dovecot.cleanup()
