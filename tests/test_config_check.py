"""`gateway check` and `gateway run` refuse a bad config with `file:line: what is wrong`."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def setup_config(tmp_path: Path, edit: tuple[str, str] | None = None, append: str = "") -> Path:
    text = (ROOT / "config.example.toml").read_text()
    if edit:
        assert edit[0] in text
        text = text.replace(edit[0], edit[1], 1)
    path = tmp_path / "config.toml"
    path.write_text(text + append)
    path.chmod(0o640)
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    return path


def gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60
    )


def line_of(path: Path, needle: str) -> int:
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if needle in line:
            return n
    raise AssertionError(needle)


def test_example_config_is_valid(tmp_path: Path) -> None:
    cfg = setup_config(tmp_path)
    out = gateway("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout


@pytest.mark.parametrize(
    "edit,needle,message",
    [
        (("workers = 16", "workers = 16\nwrokers = 3"), "wrokers = 3", "unknown key"),
        (("max_size = 26214400", 'max_size = "big"'), 'max_size = "big"', "max_size"),
        (('type = "whmcs"', 'type = "zendesk"'), 'type = "zendesk"', "unknown backend type"),
        (
            ('listen = "127.0.0.1:2525"', 'listen = "localhost"'),
            'listen = "localhost"',
            "HOST:PORT",
        ),
        (('timezone = "Europe/Berlin"', 'timezone = "Mars/Olympus"'), None, "time zone"),
        (
            ("workers = 16", "workers = 16\nworker_yield_rate = 200"),
            "worker_yield_rate = 200",
            "worker_yield_rate is no longer supported",
        ),
    ],
)
def test_each_problem_is_reported_at_its_line(
    tmp_path: Path, edit: tuple[str, str], needle: str | None, message: str
) -> None:
    cfg = setup_config(tmp_path, edit)
    out = gateway("check", "-c", str(cfg))
    assert out.returncode == 1
    assert message.lower() in out.stderr.lower(), out.stderr
    if needle is not None:
        assert f"{cfg}:{line_of(cfg, needle)}:" in out.stderr, out.stderr
    run = gateway("run", "-c", str(cfg))
    assert run.returncode == 1
    assert message.lower() in run.stderr.lower()


def test_toml_syntax_error_has_its_line(tmp_path: Path) -> None:
    cfg = setup_config(tmp_path, ("hostname = ", "hostname = = "))
    out = gateway("check", "-c", str(cfg))
    assert out.returncode == 1
    assert f"{cfg}:{line_of(cfg, 'hostname = = ')}:" in out.stderr


def test_broken_rule_file_is_reported_with_its_file_and_line(tmp_path: Path) -> None:
    cfg = setup_config(tmp_path)
    bad = tmp_path / "rules" / "50-bad.toml"
    bad.write_text(
        '[[rule]]\nname = "x"\nbackend = "nope"\n[rule.match]\nrecipient = "a@example.com"\n'
    )
    out = gateway("check", "-c", str(cfg))
    assert out.returncode == 1
    assert f"{bad}:3:" in out.stderr, out.stderr


def test_world_readable_config_with_inline_secrets_is_warned_about(tmp_path: Path) -> None:
    cfg = setup_config(tmp_path)
    cfg.chmod(0o644)
    out = gateway("check", "-c", str(cfg))
    assert "world-readable" in out.stderr
    assert "demo-password" not in out.stderr + out.stdout


@pytest.mark.parametrize(
    ("edit", "append", "warned"),
    [
        (None, "", False),  # the quick start: loopback only
        (('listen = "127.0.0.1:2525"', 'listen = "0.0.0.0:2525"'), "", True),
        (None, '\n[[imap]]\nname = "mb"\nhost = "127.0.0.1"\nsecurity = "plain"\n'
               'username = "support@example.com"\npassword = "x"\n', True),
        (('require = "none"', 'require = "authenticated"'), "", False),
    ],
)  # fmt: skip
def test_acks_to_any_sender_beyond_loopback_are_warned_about(
    tmp_path: Path, edit: tuple[str, str] | None, append: str, warned: bool
) -> None:
    cfg = setup_config(tmp_path, edit, append)
    out = gateway("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr  # a warning, not a problem
    warning = [line for line in out.stderr.splitlines() if "ack.require" in line]
    if warned:
        line = line_of(cfg, 'require = "none"   ')
        assert warning and warning[0].startswith(f"{cfg}:{line}: warning:")
    else:
        assert warning == []


def test_acks_off_are_not_warned_about(tmp_path: Path) -> None:
    cfg = setup_config(
        tmp_path,
        ('listen = "127.0.0.1:2525"', 'listen = "0.0.0.0:2525"'),
    )
    cfg.write_text(cfg.read_text().replace("[ack]\nenabled = true ", "[ack]\nenabled = false", 1))
    assert "[ack]\nenabled = false" in cfg.read_text()
    out = gateway("check", "-c", str(cfg))
    assert out.returncode == 0 and "ack.require" not in out.stderr


@pytest.mark.parametrize(
    "ticket",
    [
        'box_auth_value = "{header:X-Root-Password}"',  # from mail content: the danger
        'box_auth_value = "fixed"',
    ],
)
def test_check_refuses_box_auth_value_in_a_rule(tmp_path: Path, ticket: str) -> None:
    cfg = setup_config(tmp_path)
    rules = tmp_path / "rules" / "10-demo.toml"
    text = rules.read_text()
    anchor = 'product = ""              # InterServer product (empty: none)'
    assert anchor in text
    rules.write_text(text.replace(anchor, f"{anchor}\n{ticket}"))
    # a rule without backend is refused as well
    with (tmp_path / "rules" / "05-extra.toml").open("w") as f:
        f.write('[[rule]]\nname = "root"\ncontinue = true\n[rule.ticket]\nbox_auth_value = "x"\n')
    out = gateway("check", "-c", str(cfg))
    assert out.returncode == 1
    line = line_of(rules, "box_auth_value = ")
    assert f"10-demo.toml:{line}: " in out.stdout + out.stderr
    assert "05-extra.toml:5: " in out.stdout + out.stderr
    problems = [p for p in (out.stdout + out.stderr).splitlines() if "box_auth_value" in p]
    assert len(problems) == 2
    assert all("Root Password" in p and "config" in p for p in problems)


def test_verify_dkim_without_required_authentication_is_warned_about(tmp_path: Path) -> None:
    cfg = setup_config(tmp_path, ("verify_dkim = false", "verify_dkim = true"))
    out = gateway("check", "-c", str(cfg))
    assert out.returncode == 0, out.stderr
    line = line_of(cfg, "verify_dkim = true")
    assert f"{cfg}:{line}: warning: ack.verify_dkim has no effect unless" in out.stderr
    (tmp_path / "b").mkdir()
    cfg = setup_config(tmp_path / "b", ('require = "none"', 'require = "authenticated"'))
    cfg.write_text(cfg.read_text().replace("verify_dkim = false", "verify_dkim = true"))
    out = gateway("check", "-c", str(cfg))
    assert out.returncode == 0 and "verify_dkim" not in out.stderr
