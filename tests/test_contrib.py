"""The ready-made files in contrib/: Prometheus alert rules pass `promtool check rules` and fire on
what they should (`promtool test rules`), the rules and the Grafana dashboard use only series
the gateway exports, and the Postfix snippets route exactly the demo's accepted recipients.

promtool comes from Debian's prometheus package: scripts/test puts it in .venv/bin when it is not
on PATH; under CI (CI=true) a missing promtool is a failure, elsewhere a skip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from gateway.metrics import OUTCOMES, Metrics

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "contrib/prometheus/ticket-gateway.rules.yml"
DASHBOARD = REPO / "contrib/grafana/ticket-gateway.json"


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool") or str(REPO / ".venv/bin/promtool")
    if not os.access(found, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("promtool is missing (scripts/test extracts it from Debian's prometheus)")
        pytest.skip("promtool is missing (scripts/test extracts it from Debian's prometheus)")
    return found


def test_alert_rules_pass_promtool_check(promtool: str) -> None:
    proc = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alerts_fire_on_what_they_should(promtool: str, tmp_path: Path) -> None:
    spec = (REPO / "tests/fixtures/ticket-gateway.rules.test.yml").read_text()
    test = tmp_path / "rules.test.yml"
    test.write_text(spec.replace("  - RULES", f"  - {RULES}"))
    proc = subprocess.run(
        [promtool, "test", "rules", str(test)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_alerts_named_by_the_issue_exist() -> None:
    text = RULES.read_text()
    for alert in (
        "TicketGatewayQueueStuck",
        "TicketGatewayDeadLetters",
        "TicketGatewayBackendPaused",
        "TicketGatewayOutboxFailing",
        "TicketGatewayAckLimitHit",
    ):
        assert f"alert: {alert}\n" in text


def _exported_names() -> set[str]:
    """Every series name /metrics can show (with each labelled family given one child)."""
    m = Metrics()
    for name in OUTCOMES:
        if name != "received":
            m.outcome(name, "smtp", "r", "b")
    m.received.labels(intake="smtp").inc()
    m.backend_latency("b", 0.1, True)
    m.component_up.labels(component="spool", kind="spool").set(1)
    m.backend_paused.labels(backend="b").set(0)
    m.count("acks_withheld", reason="rate_global")
    names = set()
    for line in m.render().decode().splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def _used_names(text: str) -> set[str]:
    return set(re.findall(r"\b(gateway_[a-z_]+)", text))


def test_rules_and_dashboard_use_only_exported_series() -> None:
    exported = _exported_names()
    for path in (RULES, DASHBOARD):
        unknown = _used_names(path.read_text()) - exported
        assert not unknown, f"{path.name} uses series /metrics does not have: {sorted(unknown)}"


def test_dashboard_is_importable_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    assert all(t["expr"] for p in dash["panels"] for t in p["targets"])
    assert dash["uid"] == "ticket-gateway"


def test_postfix_snippets_route_exactly_the_accepted_recipients() -> None:
    with (REPO / "config.example.toml").open("rb") as f:
        accepted = set(tomllib.load(f)["smtp"]["recipients"])
    for name, target in (
        ("transport.smtp", "smtp:[127.0.0.1]:2525"),
        ("transport.pipe", "ticketgw:"),
    ):
        rows = [
            line.split()
            for line in (REPO / "contrib/postfix" / name).read_text().splitlines()
            if line.strip() and not line.startswith("#")
        ]
        assert {r[0] for r in rows} == accepted, name
        assert {r[1] for r in rows} == {target}, name
    master = (REPO / "contrib/postfix/master.cf.pipe").read_text()
    assert "argv=/usr/bin/gateway deliver -c /etc/ticket-gateway/config.toml" in master
    assert (
        "ticketgw_destination_recipient_limit = 1"
        in (REPO / "contrib/postfix/main.cf.pipe").read_text()
    )
