"""Rule tests (rules/tests/*.toml): run by `gateway check` and before a reload is accepted; a
failing case is reported at its file:line with expected and got."""

from __future__ import annotations

import shutil
import signal
import smtplib
import subprocess
import sys
import uuid
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from gateway.classify import token_formats
from gateway.config import load_config
from gateway.errors import ConfigError
from gateway.rules import load_rules
from gateway.ruletests import load_and_check, run_rule_tests
from tests.harness import DaemonProcess, SimProcess, wait_for, write_config

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = {
    "superoffice-soap": "superoffice-soap",
    "superoffice-rest": "superoffice-rest",
    "interserver": "interserver",
    "whmcs": "whmcs",
}
OWN = {"support@example.com", "sales@example.com", "hosting@example.com", "billing@example.com"}
TOKENS = token_formats(["[Ticket #{ref}]"])


def demo_copy(tmp_path: Path) -> Path:
    shutil.copy(ROOT / "config.example.toml", tmp_path / "config.toml")
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    shutil.copytree(ROOT / "templates", tmp_path / "templates")
    return tmp_path / "config.toml"


def gateway(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def line_of(path: Path, text: str, after: str) -> int:
    lines = path.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if after in line)
    return next(i for i in range(start, len(lines)) if lines[i].strip() == text) + 1


def break_billing(rules: Path) -> None:
    demo = rules / "10-demo.toml"
    text = demo.read_text()
    assert 'recipient = "billing@example.com"' in text
    demo.write_text(
        text.replace('recipient = "billing@example.com"', 'recipient = "old@example.com"')
    )


def test_the_demo_routes_ship_with_tests_that_pass(tmp_path: Path) -> None:
    cfg = demo_copy(tmp_path)
    r = gateway(tmp_path, "check", "-c", "config.toml")
    assert r.returncode == 0, r.stderr
    assert "9 rule tests" in r.stdout
    # every demo route has a case
    text = (ROOT / "rules" / "tests" / "demo.toml").read_text()
    for backend in BACKENDS:
        assert f'backend = "{backend}"' in text
    assert cfg.exists()


def test_a_rule_change_that_breaks_a_case_fails_check_at_file_line(tmp_path: Path) -> None:
    demo_copy(tmp_path)
    break_billing(tmp_path / "rules")
    r = gateway(tmp_path, "check", "-c", "config.toml")
    assert r.returncode == 1
    tests = tmp_path / "rules" / "tests" / "demo.toml"
    line = line_of(tests, 'backend = "whmcs"', 'name = "billing mail goes to WHMCS"')
    want = f'rules/tests/demo.toml:{line}: expected backend "whmcs", got "superoffice-soap"'
    assert any(out.endswith(want) for out in r.stderr.splitlines()), r.stderr
    rule_line = line_of(tests, 'rule = "billing"', 'name = "billing mail goes to WHMCS"')
    assert f'demo.toml:{rule_line}: expected rule "billing", got "default"' in r.stderr
    assert "Traceback" not in r.stderr
    # --no-tests skips them
    r = gateway(tmp_path, "check", "-c", "config.toml", "--no-tests")
    assert r.returncode == 0, r.stderr
    assert "rule tests" not in r.stdout


def test_the_daemon_refuses_to_start_with_failing_rule_tests(tmp_path: Path) -> None:
    demo_copy(tmp_path)
    break_billing(tmp_path / "rules")
    r = gateway(tmp_path, "run", "-c", "config.toml")
    assert r.returncode != 0
    assert 'expected backend "whmcs", got "superoffice-soap"' in r.stderr


def rules_with(tmp_path: Path, rule_text: str, cases: str, extra: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    rules = tmp_path / "rules"
    (rules / "tests").mkdir(parents=True, exist_ok=True)
    (rules / "10.toml").write_text(rule_text)
    (rules / "tests" / "t.toml").write_text(cases)
    for name, text in (extra or {}).items():
        (rules / "tests" / name).write_text(text)
    ruleset = load_rules(rules, BACKENDS, timezone="Europe/Berlin", templates={"default", "vip"})
    return run_rule_tests(
        ruleset, rules, own_addresses=OWN, token_formats=TOKENS, timezone="Europe/Berlin"
    )


RULES = """
[[rule]]
name = "night"
backend = "interserver"
[rule.match]
time = "18:00-08:00"

[[rule]]
name = "vip"
backend = "whmcs"
ack = "vip"
[rule.match]
sender_domain = "vip.example.org"
[rule.ticket]
priority = "High"
deptid = 3

[[rule]]
name = "default"
backend = "superoffice-soap"
"""


def test_cases_compare_each_expectation_and_report_at_its_line(tmp_path: Path) -> None:
    cases = """\
[[case]]
name = "vip by day"
headers = { From = "a@vip.example.org", To = "support@example.com", Subject = "Hi" }
at = 2026-03-02T10:00:00+01:00
[case.expect]
rule = "vip"
backend = "whmcs"
ack = "vip"
ticket = { priority = "High", deptid = 3 }

[[case]]
name = "wrong on purpose"
headers = { From = "a@vip.example.org", To = "support@example.com", Subject = "Hi" }
body = "text"
at = "2026-03-02T10:00:00"
[case.expect]
ack = "default"
ticket = { priority = "Low", serviceid = 7 }
action = "followup"

[[case]]
name = "at night the time rule decides (local time of the config's zone)"
headers = { From = "a@vip.example.org", To = "support@example.com", Subject = "Hi" }
at = 2026-03-02T19:30:00+01:00
[case.expect]
rule = "night"
backend = "interserver"

[[case]]
name = "a follow-up by token; an auto-reply is suppressed"
headers = { From = "x@example.net", To = "support@example.com", Subject = "AW: [Ticket #77] Hi" }
at = 2026-03-02T10:00:00+01:00
[case.expect]
action = "followup"
followup_of = "77"
ack = false
"""
    summary = rules_with(tmp_path, RULES, cases)
    assert summary.cases == 4
    got = [(p.line, p.message) for p in summary.problems]
    assert got == [
        (17, 'expected ack "default", got "vip"'),
        (18, 'expected ticket.priority "Low", got "High"'),
        (18, "expected ticket.serviceid 7, got nothing"),
        (19, 'expected action "followup", got "new"'),
    ]
    assert all(p.file.endswith("rules/tests/t.toml") for p in summary.problems)


ENVELOPE_RULES = """
[[rule]]
name = "by-envelope"
backend = "whmcs"
[rule.match]
envelope_recipient = "billing@example.com"
intake = "pipe"

[[rule]]
name = "default"
backend = "superoffice-soap"
"""


def test_a_mail_file_beside_the_test_and_the_envelope(tmp_path: Path) -> None:
    eml = (
        b"From: Someone <s@example.net>\r\nTo: list@example.net\r\nSubject: x\r\n"
        b"Message-ID: <1@example.net>\r\n\r\nbody\r\n"
    )
    cases = """\
[[case]]
name = "pipe with an envelope"
mail = "mails/a.eml"
rcpt = "billing@example.com"
intake = "pipe"
[case.expect]
rule = "by-envelope"

[[case]]
name = "the same mail from SMTP"
mail = "mails/a.eml"
rcpt = ["billing@example.com"]
[case.expect]
rule = "default"

[[case]]
name = "file missing"
mail = "mails/none.eml"
[case.expect]
rule = "x"
"""
    (tmp_path / "rules" / "tests" / "mails").mkdir(parents=True)
    (tmp_path / "rules" / "tests" / "mails" / "a.eml").write_bytes(eml)
    summary = rules_with(tmp_path, ENVELOPE_RULES, cases)
    assert [(p.line, p.message) for p in summary.problems] == [
        (18, "mail file 'mails/none.eml': No such file or directory")
    ]


def test_broken_case_files_are_problems_at_their_lines(tmp_path: Path) -> None:
    cases = """\
[[case]]
name = "typo"
headers = { From = "a@example.org", To = "support@example.com" }
[case.expect]
backnd = "whmcs"

[[case]]
name = "both"
mail = "x.eml"
headers = { From = "a@example.org" }
[case.expect]
rule = "x"

[[case]]
name = "bad time"
headers = { From = "a@example.org" }
at = "yesterday"
[case.expect]
rule = "default"
"""
    summary = rules_with(tmp_path, RULES, cases, {"empty.toml": "# nothing yet\n"})
    got = [(Path(p.file).name, p.line, p.message) for p in summary.problems]
    assert ("empty.toml", 1, "no [[case]] in this rule test file") in got
    assert ("t.toml", 5, "case[0].expect.backnd: unknown key") in got
    assert ("t.toml", 7, "give either mail (a file) or headers (and body), not both") in got
    assert ("t.toml", 17, "bad time 'yesterday': write an ISO date-time") in got
    with pytest.raises(ConfigError):
        load_and_check(
            load_rules(tmp_path / "rules", BACKENDS, templates={"default", "vip"}),
            tmp_path / "rules",
            own_addresses=OWN,
            token_formats=TOKENS,
        )


def test_loops_and_automatic_mail_use_the_configs_own_addresses(tmp_path: Path) -> None:
    cfg = load_config(demo_copy(tmp_path))
    assert "billing@example.com" in cfg.own_addresses()
    cases = """\
[[case]]
name = "loop"
headers = { From = "billing@example.com", To = "support@example.com", Subject = "x" }
[case.expect]
action = "suppress"
rule = ""
"""
    (tmp_path / "rules" / "tests" / "loop.toml").write_text(cases)
    r = gateway(tmp_path, "check", "-c", "config.toml")
    assert r.returncode == 0, r.stderr
    assert "10 rule tests" in r.stdout


def send(port: int, to: str, subject: str) -> None:
    msg = EmailMessage()
    msg["From"] = "payer@customer.example.org"
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{uuid.uuid4().hex}@customer.example.org>"
    msg.set_content("Please check the invoice.")
    with smtplib.SMTP("127.0.0.1", port) as s:
        s.send_message(msg)


def test_a_reload_whose_tests_fail_keeps_the_old_rules_and_says_so(tmp_path: Path) -> None:
    sim = SimProcess(tmp_path)
    sim.start()
    cfg = write_config(tmp_path / "gw", sim_http=sim.http_port, sim_smtp=sim.smtp_port)
    daemon = DaemonProcess(cfg)
    daemon.start()
    try:
        break_billing(cfg.parent / "rules")
        daemon.signal(signal.SIGHUP)

        def refused() -> dict | None:  # type: ignore[type-arg]
            r = httpx.get(f"http://127.0.0.1:{daemon.health_port}/healthz", timeout=2)
            rules = r.json()["components"]["rules"]
            return r.json() if "reload refused" in rules.get("detail", "") else None

        health = wait_for(refused, timeout=20)
        detail = health["components"]["rules"]["detail"]
        assert "old rules in force" in detail
        assert 'expected backend "whmcs", got "superoffice-soap"' in detail
        assert "rules/tests/demo.toml:" in detail
        # the old rules still route billing mail to WHMCS
        subject = f"invoice {uuid.uuid4().hex[:6]}"
        send(daemon.smtp_port, "billing@example.com", subject)
        t = wait_for(
            lambda: [t for t in sim.get("/_sim/tickets") if t["title"] == subject and t["messages"]]
        )
        assert t[0]["system"] == "whmcs"
    finally:
        daemon.stop()
        sim.stop()
