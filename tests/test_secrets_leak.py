"""Secrets never show (issue 9): not in `gateway check`, error messages, logs, /healthz, /metrics.

Every kind of source is used at once with unusual values (quotes, backslashes, `$`, non-ASCII,
emoji): inline in the TOML, a file, a bare file name in $CREDENTIALS_DIRECTORY (systemd
LoadCredential=), an environment variable. Most of them are refused by the simulators, so the
error paths run and log; the SuperOffice SOAP one is right, so the success path runs too. The
daemon runs at log level debug as a real `gateway run` process against `gateway simulate`; all
its output, its log file, every CLI output (check, a broken config, queue ls/show) and the
/healthz and /metrics bodies are searched for each value, for a distinctive part of it (which
survives any escaping), and for the Basic-auth encoding of the WebAPI credentials.

Also: the warning for a world-readable config with inline secrets, SIGHUP re-reading a rotated
secret file (the WHMCS backend is rebuilt with it and its waiting mail gets its ticket), and the
log file being reopened on SIGHUP after logrotate moved it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import smtplib
import stat
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest

from gateway.config import load_config
from tests.harness import DaemonProcess, SimProcess, free_port, wait_for, write_config

WEIRD = " \"q\" 'a' \\ $HOME ${X} `id` %s <&> ;-- ü€🙂"
# Each secret: a distinctive core (searched for, survives any quoting) plus the unusual rest.
SECRETS = {
    "rest": "CoreRest7731" + WEIRD,  # superoffice-rest password, from an environment variable
    "interserver": "CoreIsrv4410" + WEIRD,  # inline in the TOML
    "whmcs": "CoreWhmcs9902" + WEIRD,  # secret_file, an absolute path
    "accesskey": "CoreAkey1207" + WEIRD,  # whmcs accesskey from an environment variable
    "relay": "CoreRelay5563" + WEIRD,  # ack relay_password inline
    "imap": "CoreImap3318" + WEIRD,  # imap password inline
    "soap": "demo-password",  # right: from $CREDENTIALS_DIRECTORY/soap-pass
}
REST_USER = "gateway@example.com"


def _toml(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)  # a JSON string is a TOML basic string


def _edit(text: str, section: str, key: str, line: str | None) -> str:
    """Replace (or add, or with None remove) `key = ...` inside `[section]`."""
    head = f"[{section}]\n"
    start = text.index(head) + len(head)
    nxt = re.search(r"^\[", text[start:], re.M)
    end = start + nxt.start() if nxt else len(text)
    body = text[start:end]
    pattern = re.compile(rf"^#?\s*{re.escape(key)} = .*\n", re.M)
    if pattern.search(body):
        new = "" if line is None else line + "\n"
        body = pattern.sub(lambda _: new, body, count=1)
    elif line is not None:
        body = line + "\n" + body
    return text[:start] + body + text[end:]


def _needles() -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    for name, value in SECRETS.items():
        out[f"{name}:value"] = value.encode()
        out[f"{name}:core"] = value.split(" ")[0].encode()
        out[f"{name}:urlencoded"] = urllib.parse.quote_plus(value).encode()
    basic = base64.b64encode(f"{REST_USER}:{SECRETS['rest']}".encode()).decode()
    out["rest:basic-auth"] = basic[8:40].encode()  # a stretch that depends on the password
    return out


def _leaks(name: str, data: bytes) -> list[str]:
    low = data.lower()
    return [f"{name}: {what}" for what, n in _needles().items() if n.lower() in low]


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[SimProcess]:
    s = SimProcess(tmp_path / "sim")
    s.start()
    yield s
    s.stop()


@pytest.fixture
def secret_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Environment and files the secrets come from; returns the credentials directory."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    (creds / "soap-pass").write_text(SECRETS["soap"] + "\n")
    (creds / "soap-pass").chmod(0o600)
    whmcs = tmp_path / "whmcs-secret"
    whmcs.write_text(SECRETS["whmcs"] + "\n")
    whmcs.chmod(0o600)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    monkeypatch.setenv("GW_TEST_REST_PASSWORD", SECRETS["rest"])
    monkeypatch.setenv("GW_TEST_WHMCS_ACCESSKEY", SECRETS["accesskey"])
    return creds


def _config(tmp_path: Path, sim: SimProcess) -> Path:
    directory = tmp_path / "gw"
    path = write_config(directory, sim_http=sim.http_port, sim_smtp=sim.smtp_port)
    text = path.read_text()
    text = _edit(text, "gateway", "log_level", 'log_level = "debug"')
    text = _edit(text, "gateway", "log_file", 'log_file = "log/gateway.log"')
    text = _edit(text, "backends.superoffice-soap", "password", 'password_file = "soap-pass"')
    text = _edit(
        text, "backends.superoffice-rest", "password", 'password_env = "GW_TEST_REST_PASSWORD"'
    )
    text = _edit(
        text, "backends.interserver", "password", f"password = {_toml(SECRETS['interserver'])}"
    )
    secret_file = tmp_path / "whmcs-secret"
    text = _edit(text, "backends.whmcs", "secret", f"secret_file = {_toml(str(secret_file))}")
    text = _edit(
        text, "backends.whmcs", "accesskey_env", 'accesskey_env = "GW_TEST_WHMCS_ACCESSKEY"'
    )
    text = _edit(text, "ack", "relay_username", 'relay_username = "gateway"')
    text = _edit(text, "ack", "relay_password", f"relay_password = {_toml(SECRETS['relay'])}")
    text += f"""
[[imap]]
name = "leak-box"
host = "127.0.0.1"
port = {free_port()}
security = "plain"
username = "box@example.com"
password = {_toml(SECRETS["imap"])}
"""
    (directory / "log").mkdir()
    path.write_text(text)
    path.chmod(0o600)
    return path


def _gateway(cfg: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args, "-c", str(cfg)],
        capture_output=True,
        timeout=120,
        cwd=cfg.parent,
    )


def _send(port: int, rcpt: str, subject: str) -> None:
    msg = EmailMessage()
    msg["From"] = "customer@example.org"
    msg["To"] = rcpt
    msg["Subject"] = subject
    msg["Message-ID"] = f"<{subject.replace(' ', '-')}@example.org>"
    msg.set_content("Hello, please help.")
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.send_message(msg)


def test_config_objects_never_show_secrets(
    tmp_path: Path, sim: SimProcess, secret_env: Path
) -> None:
    cfg = load_config(_config(tmp_path, sim))
    shown = repr(cfg) + str(cfg) + cfg.model_dump_json() + repr(cfg.model_dump())
    shown += "".join(repr(b) + b.model_dump_json() for b in cfg.backends.values())
    assert _leaks("config repr", shown.encode()) == []
    assert cfg.ack.relay_password is not None
    assert cfg.ack.relay_password.get_secret_value() == SECRETS["relay"]  # held, not shown


def test_no_secret_in_any_output(tmp_path: Path, sim: SimProcess, secret_env: Path) -> None:
    cfg = _config(tmp_path, sim)
    outputs: dict[str, bytes] = {}

    check = _gateway(cfg, "check")
    assert check.returncode == 0, check.stderr.decode()
    assert b"world-readable" not in check.stderr  # 0600
    outputs["check"] = check.stdout + check.stderr

    # broken configs: a wrong type next to a secret, a secret of the wrong type, a misspelt secret
    # key, an unreadable secret file, a missing variable, and a TOML syntax error on a secret line
    text = cfg.read_text()
    broken = _edit(text, "backends.interserver", "timeout", 'timeout = "soon"')
    broken = _edit(broken, "ack", "relay_password", f"relay_password = [{_toml(SECRETS['relay'])}]")
    broken = _edit(broken, "backends.whmcs", "identifier", f"identifer = {_toml(SECRETS['whmcs'])}")
    bad = cfg.with_name("broken.toml")
    bad.write_text(broken)
    for cmd in ("check", "run"):
        res = _gateway(bad, cmd)
        assert res.returncode == 1
        assert b"timeout" in res.stderr and b"relay_password" in res.stderr
        outputs[f"broken {cmd}"] = res.stdout + res.stderr
    unreadable = cfg.with_name("unreadable.toml")
    unreadable.write_text(
        _edit(text, "backends.whmcs", "secret_file", 'secret_file = "/nonexistent/whmcs"')
    )
    os.environ.pop("GW_TEST_REST_PASSWORD")
    res = _gateway(unreadable, "check")
    assert res.returncode == 1
    assert b"/nonexistent/whmcs" in res.stderr and b"GW_TEST_REST_PASSWORD" in res.stderr
    outputs["unreadable check"] = res.stdout + res.stderr
    os.environ["GW_TEST_REST_PASSWORD"] = SECRETS["rest"]
    syntax = cfg.with_name("syntax.toml")
    syntax.write_text(
        text.replace(
            f"password = {_toml(SECRETS['interserver'])}",
            f"password = {_toml(SECRETS['interserver'])[:-1]}",
        )
    )
    res = _gateway(syntax, "check")
    assert res.returncode == 1 and b"TOML syntax" in res.stderr
    outputs["syntax check"] = res.stdout + res.stderr

    daemon = DaemonProcess(cfg)
    daemon.start()
    try:
        support = "support@example.com"
        for rcpt in (support, "sales@example.com", "hosting@example.com", "billing@example.com"):
            _send(daemon.smtp_port, rcpt, f"leak test {rcpt.split('@')[0]}")
        health_url = f"http://127.0.0.1:{daemon.health_port}"

        def settled() -> dict | None:  # type: ignore[type-arg]
            body = httpx.get(f"{health_url}/healthz", timeout=5).json()
            comps = body["components"]
            paused = all(
                comps.get(f"backend:{b}", {}).get("status") == "down"
                for b in ("superoffice-rest", "interserver", "whmcs")
            )
            titles = {t["title"] for t in sim.get("/_sim/tickets")}
            return body if paused and "leak test support" in titles else None

        body = wait_for(settled, timeout=90, interval=0.3)
        assert body, (cfg.parent / "log" / "gateway.log").read_text()[-5000:]
        health = httpx.get(f"{health_url}/healthz", timeout=5)
        assert health.status_code == 503  # backends paused: credentials refused
        outputs["/healthz"] = health.content
        outputs["/metrics"] = httpx.get(f"{health_url}/metrics", timeout=5).content
        ls = daemon.gateway("queue", "-c", str(cfg), "ls", "--json")
        outputs["queue ls"] = ls.stdout + ls.stderr
        for row in json.loads(ls.stdout):
            res = daemon.gateway("queue", "-c", str(cfg), "show", str(row["id"]))
            outputs[f"queue show {row['id']}"] = res.stdout + res.stderr
        stats = daemon.gateway("queue", "-c", str(cfg), "stats")
        outputs["queue stats"] = stats.stdout + stats.stderr

        # logrotate moves the file; SIGHUP reopens it. The rotated WHMCS secret is read again
        # and that backend rebuilt: its waiting mail becomes a ticket.
        log_file = cfg.parent / "log" / "gateway.log"
        log_file.rename(log_file.with_name("gateway.log.1"))
        (tmp_path / "whmcs-secret").write_text("demo-secret\n")
        daemon.signal(signal.SIGHUP)
        assert wait_for(lambda: log_file.exists() and "event=reloaded" in log_file.read_text())
        # the intake logs its reload first; the worker process rebuilds the backend after it
        assert wait_for(lambda: "event=backend_rebuilt backend=whmcs" in log_file.read_text())
        assert wait_for(
            lambda: "leak test billing" in {t["title"] for t in sim.get("/_sim/tickets")},
            timeout=60,
        ), log_file.read_text()[-3000:]
        outputs["/healthz after reload"] = httpx.get(f"{health_url}/healthz", timeout=5).content
    finally:
        assert daemon.stop() == 0
    outputs["daemon stdout+stderr"] = daemon.log.read_bytes()
    logs = sorted((cfg.parent / "log").iterdir())
    assert len(logs) == 2
    for f in logs:
        outputs[f.name] = f.read_bytes()
    text = outputs["gateway.log.1"].decode()
    # the error paths did run and log (otherwise this test would prove little)
    assert "level=debug" in text
    for backend in ("superoffice-rest", "interserver", "whmcs"):
        assert f"event=backend_paused backend={backend}" in text, backend
    assert "event=ack_deferred" in text or "event=ack_failed" in text
    assert "leak-box" in text  # the IMAP intake tried and failed to connect
    leaks = [leak for name, data in outputs.items() for leak in _leaks(name, data)]
    assert leaks == []


def test_world_readable_config_with_inline_secrets_is_warned_about(
    tmp_path: Path, sim: SimProcess, secret_env: Path
) -> None:
    cfg = _config(tmp_path, sim)
    cfg.chmod(0o644)
    res = _gateway(cfg, "check")
    assert res.returncode == 0  # a warning, not a problem
    err = res.stderr.decode()
    assert "world-readable" in err
    for key in ("backends.interserver.password", "ack.relay_password", "imap[0].password"):
        assert key in err
    assert _leaks("check", res.stdout + res.stderr) == []
    # a world-readable secret file is named too
    (secret_env / "soap-pass").chmod(0o644)
    res = _gateway(cfg, "check")
    assert "backends.superoffice-soap.password_file" in res.stderr.decode()
    # private again: no warning
    cfg.chmod(0o640)
    (secret_env / "soap-pass").chmod(0o600)
    res = _gateway(cfg, "check")
    assert res.returncode == 0 and b"warning" not in res.stderr
    # without inline secrets a readable config is fine
    text = cfg.read_text()
    for section, key in (
        ("backends.interserver", "password"),
        ("ack", "relay_password"),
    ):
        text = _edit(text, section, key, None)
    text = _edit(
        text, "backends.interserver", "password_env", 'password_env = "GW_TEST_REST_PASSWORD"'
    )
    text = text.replace(
        f"password = {_toml(SECRETS['imap'])}", 'password_env = "GW_TEST_REST_PASSWORD"'
    )
    cfg.write_text(text)
    cfg.chmod(0o644)
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o644
    res = _gateway(cfg, "check")
    assert res.returncode == 0, res.stderr.decode()
    assert b"world-readable" not in res.stderr
