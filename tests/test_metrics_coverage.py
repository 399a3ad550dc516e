"""Every series `/metrics` lists moves when its event happens: one case per counter, driven
against the real daemon and simulators, and a check that no counter is left without a case.
`gateway_possible_duplicates_total` needs a crash in the middle of a create call: it is made to
move in-process, with the worker, the spool and the SOAP simulator as they run."""

from __future__ import annotations

import logging
import smtplib
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.ack import load_templates
from gateway.backends.base import MemoryProgress
from gateway.backends.superoffice_soap import SuperOfficeSoapBackend, SuperOfficeSoapConfig
from gateway.logs import event_text
from gateway.mail import parse
from gateway.metrics import Metrics
from gateway.models import Envelope
from gateway.rules import RouteContext, load_rules
from gateway.simulators.server import Simulators
from gateway.simulators.state import ACCOUNT_EMAIL, PASSWORD
from gateway.spool.sqlite import SqliteSpool
from gateway.worker import Worker, WorkerSettings
from tests.harness import DaemonProcess, SimProcess, wait_for, write_config

ROOT = Path(__file__).resolve().parent.parent
Stack = tuple[SimProcess, DaemonProcess]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("metrics")
    sim = SimProcess(tmp)
    sim.start()
    cfg = write_config(tmp / "gw", sim_http=sim.http_port, sim_smtp=sim.smtp_port)
    daemon = DaemonProcess(cfg)
    daemon.start()
    yield sim, daemon
    daemon.stop()
    sim.stop()


def _mail(subject: str, *, to: str = "billing@example.com", sender: str = "") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender or f"m{uuid.uuid4().hex[:8]}@customer.example"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@customer.example>"
    msg.set_content("count me")
    return msg


def _send(daemon: DaemonProcess, *msgs: EmailMessage) -> None:
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as s:
        for msg in msgs:
            s.send_message(msg)


def _samples(daemon: DaemonProcess) -> dict[str, float]:
    """Sum per sample name (labels folded): `gateway_dead_total`, `..._seconds_count`...; and
    per name and one label (`gateway_acks_withheld_total{reason="rate_sender"}`)."""
    text = httpx.get(f"http://127.0.0.1:{daemon.health_port}/metrics", timeout=5).text
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
            for k, v in s.labels.items():
                key = f'{s.name}{{{k}="{v}"}}'
                out[key] = out.get(key, 0.0) + s.value
    return out


def _ticketed(sim: SimProcess, subject: str) -> dict | None:  # type: ignore[type-arg]
    for t in sim.get("/_sim/tickets"):
        if t["title"] == subject and t["messages"]:
            return t  # type: ignore[no-any-return]
    return None


# -- what makes each series move --------------------------------------------------------------------


def ticket(sim: SimProcess, daemon: DaemonProcess) -> None:
    subject = f"metrics {uuid.uuid4().hex[:8]}"
    _send(daemon, _mail(subject))
    assert wait_for(lambda: _ticketed(sim, subject), timeout=30)


def followup(sim: SimProcess, daemon: DaemonProcess) -> None:
    subject = f"metrics follow-up {uuid.uuid4().hex[:8]}"
    _send(daemon, _mail(subject))
    t = wait_for(lambda: _ticketed(sim, subject), timeout=30)
    assert t
    _send(daemon, _mail(f"Re: [Ticket #{t['ref']}] {subject}"))


def suppress(sim: SimProcess, daemon: DaemonProcess) -> None:
    msg = _mail("newsletter")
    msg["Precedence"] = "bulk"
    _send(daemon, msg)


def duplicate(sim: SimProcess, daemon: DaemonProcess) -> None:
    msg = _mail(f"twice {uuid.uuid4().hex[:8]}")
    _send(daemon, msg)
    assert wait_for(lambda: _ticketed(sim, str(msg["Subject"])), timeout=30)
    _send(daemon, msg)  # the same Message-ID and content again


def defer(sim: SimProcess, daemon: DaemonProcess) -> None:
    sim.post("/_sim/fault", {"system": "whmcs", "mode": "error", "count": 1})
    subject = f"deferred once {uuid.uuid4().hex[:8]}"
    _send(daemon, _mail(subject))
    assert wait_for(lambda: _ticketed(sim, subject), timeout=30)


def dead(sim: SimProcess, daemon: DaemonProcess) -> None:
    # every call refused until the test clears it (after the series moved)
    sim.post("/_sim/fault", {"system": "whmcs", "mode": "reject"})
    _send(daemon, _mail(f"refused {uuid.uuid4().hex[:8]}"))


def withhold(sim: SimProcess, daemon: DaemonProcess) -> None:
    _send(daemon, _mail(f"from a robot {uuid.uuid4().hex[:8]}", sender="noreply@customer.example"))


def rate_limited(sim: SimProcess, daemon: DaemonProcess) -> None:
    # one sender past [ack] rate_limit (5 an hour in the example config): the sixth is held back
    sender = f"eager{uuid.uuid4().hex[:8]}@customer.example"
    _send(daemon, *(_mail(f"again {n} {uuid.uuid4().hex[:8]}", sender=sender) for n in range(6)))


CASES: dict[str, Callable[[SimProcess, DaemonProcess], None]] = {
    "gateway_received_total": ticket,
    "gateway_ticketed_total": ticket,
    "gateway_followup_total": followup,
    "gateway_suppressed_total": suppress,
    "gateway_duplicate_total": duplicate,
    "gateway_deferred_total": defer,
    "gateway_dead_total": dead,
    "gateway_dead_letters": dead,  # a gauge: dead mails in the spool
    "gateway_acks_sent_total": ticket,
    'gateway_acks_withheld_total{reason="no_reply_address"}': withhold,
    # the hourly limits are reasons of the same counter (one series for "no ack went out")
    'gateway_acks_withheld_total{reason="rate_sender"}': rate_limited,
    "gateway_backend_latency_seconds_count": ticket,
}
IN_PROCESS = {"gateway_possible_duplicates_total"}  # test_possible_duplicate_* below
# moved where its event can be made: a node killed with mails in hand
ELSEWHERE = {"gateway_recovered_total": "tests/test_cluster.py"}
# gauges that follow the queue or the components rather than count events (read at scrape time)
LEVELS = {
    "gateway_queue_depth",
    "gateway_oldest_queued_age_seconds",
    "gateway_outbox_pending",
    "gateway_component_up",
    "gateway_backend_paused",
}


def test_every_counter_has_a_case(stack: Stack) -> None:
    _sim, daemon = stack
    text = httpx.get(f"http://127.0.0.1:{daemon.health_port}/metrics", timeout=5).text
    listed = set()
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("gateway_") or fam.name.endswith("_created"):
            continue  # (`_created`: the creation time prometheus_client adds to a counter)
        name = {
            "counter": fam.name + "_total",
            "histogram": fam.name + "_count",
        }.get(fam.type, fam.name)
        listed.add(name)
    cases = {c.split("{", 1)[0] for c in CASES}
    assert listed - LEVELS - IN_PROCESS - set(ELSEWHERE) - cases == set()


@pytest.mark.parametrize("series", sorted(CASES))
def test_series_moves_when_its_event_happens(stack: Stack, series: str) -> None:
    sim, daemon = stack
    if series not in _samples(daemon) and series.endswith("_total"):
        # a labelled counter shows no sample before its first event: it must appear
        before = 0.0
    else:
        before = _samples(daemon).get(series, 0.0)
    CASES[series](sim, daemon)
    moved = wait_for(lambda: _samples(daemon).get(series, 0.0) > before, timeout=30)
    sim.post("/_sim/fault", {"system": "whmcs", "mode": "ok"})
    assert moved, f"{series} stayed at {before}"


# -- a possible duplicate: a create call cut by a crash where the system cannot be searched --------


async def test_possible_duplicate_is_counted_and_logged_with_both_ids(
    sims: Simulators, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = SuperOfficeSoapBackend(
        "superoffice-soap",
        SuperOfficeSoapConfig.model_validate(
            {
                "type": "superoffice-soap",
                "url": sims.base_url + "/superoffice/soap/customer",
                "username": ACCOUNT_EMAIL,
                "password": PASSWORD,
            }
        ),
        base_dir=tmp_path,
    )
    rules = load_rules(
        ROOT / "rules",
        {n: n for n in ("superoffice-soap", "superoffice-rest", "interserver", "whmcs")},
    )
    spool = SqliteSpool(tmp_path / "s.sqlite")
    subject = f"lost answer {uuid.uuid4().hex[:8]}"
    raw = (
        f"From: anna@customer.example\r\nTo: support@example.com\r\nSubject: {subject}\r\n"
        f"Message-ID: <{uuid.uuid4().hex}@customer.example>\r\n\r\nhelp\r\n"
    ).encode()
    env = Envelope("anna@customer.example", ("support@example.com",))
    try:
        put = await spool.put(raw, env)
        # the create call the crash cut: the ticket exists, its id never reached the spool
        mail = parse(raw)
        decision = rules.route(mail, env, RouteContext(now=datetime.now(UTC)))
        assert decision.backend == "superoffice-soap"
        first = await backend.open_ticket(decision, mail, MemoryProgress())
        # other tickets in between (another worker's) must not be taken for it
        await backend.open_ticket(decision, parse(raw.replace(b"help", b"x").replace(
            subject.encode(), b"another subject")), MemoryProgress())  # fmt: skip
        assert await spool.claim_due(1) == [put.id]
        await spool.begin_step(put.id, "newTicket")
        recovered = await spool.recover()
        assert (recovered.requeued, recovered.uncertain) == (1, 1)  # flagged uncertain
        metrics = Metrics()
        worker = Worker(
            spool,
            {"superoffice-soap": backend},
            rules,
            load_templates(ROOT / "templates"),
            WorkerSettings(),
            tokens={"superoffice-soap": "[Ticket #{ref}]"},
            metrics=metrics,
        )
        assert await spool.claim_due(1) == [put.id]
        with caplog.at_level(logging.WARNING, logger="gateway.worker"):
            await worker.process(put.id)
        row = await spool.load(put.id)
        assert row is not None and row.state == "done" and row.ticket_ref != first.ref
        assert f"the first ticket is {first.id}" in row.last_error
        value = metrics.registry.get_sample_value(
            "gateway_possible_duplicates_total", {"backend": "superoffice-soap"}
        )
        assert value == 1
        lines = [event_text(r) for r in caplog.records if "possible_duplicate" in event_text(r)]
        assert lines == [
            f"event=possible_duplicate id={put.id} backend=superoffice-soap"
            f" ticket={row.ticket_id} first_ticket={first.id}"
        ]
    finally:
        await backend.aclose()
        await spool.close()


def test_metrics_text_shows_no_addresses(stack: Stack) -> None:
    _sim, daemon = stack
    time.sleep(0.1)
    text = httpx.get(f"http://127.0.0.1:{daemon.health_port}/metrics", timeout=5).text
    assert "customer.example" not in text and "metrics " not in text
