"""The spam-relay drill of issue 15, against the real daemon and simulators: forged senders get
tickets but no acknowledgement when authentication is required; variants of one address, many
addresses of one domain and a flood of strangers are capped by limits that cannot be dodged,
while a known customer keeps getting acknowledgements."""

from __future__ import annotations

import json
import re
import smtplib
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from tests.harness import DaemonProcess, SimProcess, wait_for, write_config


def _mail(
    subject: str, sender: str, *, name: str = "Carla Customer", **headers: str
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"{name} <{sender}>"
    msg["To"] = "support@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@example.org>"
    for k, v in headers.items():
        msg[k.replace("_", "-")] = v
    msg.set_content("Hello")
    return msg


def _send(port: int, msgs: list[EmailMessage]) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        for msg in msgs:
            s.send_message(msg)


def _tickets(sim: SimProcess, tag: str) -> list[dict]:  # type: ignore[type-arg]
    return [t for t in sim.get("/_sim/tickets") if tag in t["title"] and t["messages"]]


def _acks(sim: SimProcess, tag: str) -> list[dict]:  # type: ignore[type-arg]
    return [m for m in sim.get("/_sim/outbox") if tag in m["subject"] or tag in m["body"]]


def _metric(daemon: DaemonProcess, name: str, **labels: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{daemon.health_port}/metrics", timeout=5).text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{name}(?:\{{{re.escape(want)}\}})? ([0-9.e+]+)$" if want else rf"^{name} (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


@pytest.fixture
def authenticated(tmp_path: Path) -> Iterator[tuple[SimProcess, DaemonProcess]]:
    sim = SimProcess(tmp_path)
    sim.start()
    cfg = write_config(
        tmp_path / "gw",
        sim_http=sim.http_port,
        sim_smtp=sim.smtp_port,
        replace={
            'require = "none"': 'require = "authenticated"',
            "trusted_authserv_ids = []": 'trusted_authserv_ids = ["mx.example.com"]',
        },
    )
    daemon = DaemonProcess(cfg)
    daemon.start()
    yield sim, daemon
    daemon.stop()
    sim.stop()


def test_authenticated_mode_answers_only_authenticated_senders(
    authenticated: tuple[SimProcess, DaemonProcess], tmp_path: Path
) -> None:
    sim, daemon = authenticated
    tag = uuid.uuid4().hex[:8]
    spam = f"Cheap pills {tag} at http://spam.example/buy"
    forged = _mail(
        spam, "victim@victim.example", name="Visit http://spam.example", Reply_To="x@victim.example"
    )
    untrusted = _mail(
        spam + " u",
        "victim2@victim.example",
        Authentication_Results="evil.example.net; dmarc=pass header.from=victim.example",
    )
    good = _mail(
        spam + " a",
        "anna@customer.example",
        name="Visit http://spam.example",
        Authentication_Results="mx.example.com; dkim=pass header.d=customer.example;"
        " dmarc=pass header.from=customer.example",
    )
    _send(daemon.smtp_port, [forged, untrusted, good])
    # every mail becomes a ticket, authenticated or not
    assert wait_for(lambda: len(_tickets(sim, tag)) == 3, timeout=40), _tickets(sim, tag)
    acks = wait_for(lambda: _acks(sim, tag), timeout=20)
    assert [a["rcpt_tos"] for a in acks] == [["anna@customer.example"]]
    ack = acks[0]
    # quotes neither the display name nor a clickable link
    assert "Visit" not in ack["body"] and "Visit" not in ack["subject"]
    assert "http://" not in ack["subject"] + ack["body"]
    assert "spam[.]example" in ack["subject"]
    assert wait_for(lambda: _metric(daemon, "gateway_acks_sent_total") == 1, timeout=10)
    assert _metric(daemon, "gateway_acks_withheld_total", reason="unauthenticated") == 2

    # the dry run says why, with the worker's own decision code
    for msg, ack_expected, why in (
        (forged, False, "sender not authenticated: no Authentication-Results header"),
        (untrusted, False, "untrusted authserv-id(s) evil.example.net"),
        (good, True, "acknowledgement allowed: dkim=pass"),
    ):
        eml = tmp_path / "m.eml"
        eml.write_bytes(bytes(msg))
        out = daemon.gateway("route", "-c", str(daemon.config), str(eml), "--json")
        assert out.returncode == 0, out.stderr
        decision = json.loads(out.stdout)
        assert decision["ack"] is ack_expected
        assert any(why in r for r in decision["reasons"]), decision["reasons"]


@pytest.fixture
def limited(tmp_path: Path) -> Iterator[tuple[SimProcess, DaemonProcess]]:
    sim = SimProcess(tmp_path)
    sim.start()
    cfg = write_config(
        tmp_path / "gw",
        sim_http=sim.http_port,
        sim_smtp=sim.smtp_port,
        replace={
            "domain_rate_limit = 100": "domain_rate_limit = 10",
            "global_rate_limit = 5000": "global_rate_limit = 40",
            "stranger_share = 0.8": "stranger_share = 0.75",
        },
    )
    daemon = DaemonProcess(cfg)
    daemon.start()
    yield sim, daemon
    daemon.stop()
    sim.stop()


def test_limits_cannot_be_dodged_and_known_customers_keep_their_acks(
    limited: tuple[SimProcess, DaemonProcess],
) -> None:
    sim, daemon = limited
    tag = uuid.uuid4().hex[:8]
    sent = 0

    def batch(name: str, senders: list[str]) -> None:
        nonlocal sent
        _send(daemon.smtp_port, [_mail(f"{name} {tag} {n}", s) for n, s in enumerate(senders)])
        sent += len(senders)
        assert wait_for(lambda: len(_tickets(sim, tag)) == sent, timeout=60)
        assert wait_for(lambda: _metric(daemon, "gateway_outbox_pending") == 0, timeout=20)

    def acks_to(pattern: str) -> int:
        return sum(1 for a in _acks(sim, tag) if re.fullmatch(pattern, a["rcpt_tos"][0]))

    batch("first", ["customer@known.example"])  # a ticket conversation of one's own
    batch("variants", [f"Victim+{n}@victim.example" for n in range(20)])
    batch("domain", [f"user{n}@mail.bigcorp.example" for n in range(20)])
    batch("flood", [f"s{n}@flood{n}.example" for n in range(20)])  # the stranger share: 30
    batch("again", ["customer@known.example"])

    assert acks_to(r"victim\+\d+@victim\.example") == 5  # per normalised sender
    assert acks_to(r"user\d+@mail\.bigcorp\.example") == 10  # per domain
    assert acks_to(r"s\d+@flood\d+\.example") == 30 - 1 - 5 - 10  # strangers' share
    assert acks_to(r"customer@known\.example") == 2  # still answered during the flood
    assert wait_for(lambda: _metric(daemon, "gateway_acks_sent_total") == 31, timeout=10)
    assert _metric(daemon, "gateway_acks_withheld_total", reason="rate_sender") == 15
    assert _metric(daemon, "gateway_acks_withheld_total", reason="rate_domain") == 10
    assert _metric(daemon, "gateway_acks_withheld_total", reason="rate_global") == 6


# -- the gateway's own DKIM check ([ack] verify_dkim): no MTA in front writes a header -----------


def test_own_dkim_check_authenticates_a_signed_sender(tmp_path: Path) -> None:
    from tests.dns_server import TxtServer
    from tests.test_dkimcheck import make_key, signed

    pem, txt = make_key(tmp_path)
    tag = uuid.uuid4().hex[:8]

    def mail(subject: str, sender: str) -> bytes:
        msg = _mail(f"{subject} {tag}", sender)
        return bytes(msg).replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")

    good = signed(mail("signed", "anna@customer.example"), pem, "mail.customer.example")
    tampered = signed(mail("tampered", "bob@customer.example"), pem, "customer.example")
    tampered = tampered.replace(b"Hello", b"Hello, buy pills at http://spam.example")
    foreign = signed(mail("foreign", "victim@victim.example"), pem, "spammer.example")
    with TxtServer(
        {
            "sel._domainkey.mail.customer.example": txt,
            "sel._domainkey.customer.example": txt,
            "sel._domainkey.spammer.example": txt,
        }
    ) as dns:
        sim = SimProcess(tmp_path)
        sim.start()
        cfg = write_config(
            tmp_path / "gw",
            sim_http=sim.http_port,
            sim_smtp=sim.smtp_port,
            replace={
                'require = "none"': 'require = "authenticated"',
                "trusted_authserv_ids = []": 'trusted_authserv_ids = ["mx.example.com"]',
                "verify_dkim = false": "verify_dkim = true",
                "dkim_nameservers = []": f'dkim_nameservers = ["127.0.0.1:{dns.port}"]',
            },
        )
        daemon = DaemonProcess(cfg)
        daemon.start()
        try:
            with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as s:
                for sender, raw in (
                    ("anna@customer.example", good),
                    ("bob@customer.example", tampered),
                    ("victim@victim.example", foreign),
                ):
                    s.sendmail(sender, ["support@example.com"], raw)
            assert wait_for(lambda: len(_tickets(sim, tag)) == 3, timeout=40), _tickets(sim, tag)
            acks = wait_for(lambda: _acks(sim, tag), timeout=20)
            assert [a["rcpt_tos"] for a in acks] == [["anna@customer.example"]]
            assert wait_for(
                lambda: (
                    _metric(daemon, "gateway_acks_withheld_total", reason="unauthenticated") == 2
                ),
                timeout=10,
            )
            # the dry run makes the same check and says why
            for raw, ack_expected, why in (
                (good, True, "dkim=pass (d=mail.customer.example, aligned with From) verified"),
                (tampered, False, "own DKIM check failed: d=customer.example: body hash mismatch"),
                (foreign, False, "d=spammer.example not aligned with From (victim.example)"),
            ):
                eml = tmp_path / "m.eml"
                eml.write_bytes(raw)
                out = daemon.gateway("route", "-c", str(daemon.config), str(eml), "--json")
                assert out.returncode == 0, out.stderr
                decision = json.loads(out.stdout)
                assert decision["ack"] is ack_expected, decision
                assert any(why in r for r in decision["reasons"]), decision["reasons"]
            assert "sel._domainkey.spammer.example." not in dns.queries  # never looked up
        finally:
            daemon.stop()
            sim.stop()
