"""The `gateway` command line: every subcommand with bad input says one line and exits with its
documented code (never a traceback); --version, -c before or after the command, hidden internal
commands, `route -`, `deliver` refusing recipients SMTP refuses, `check` at the real file:line.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway import __version__
from gateway.cli import EXIT_CODES, build_parser, main

ROOT = Path(__file__).resolve().parent.parent

MAIL = b"From: alice@example.org\r\nTo: support@example.com\r\nSubject: printer\r\n\r\nIt is on fire.\r\n"


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    shutil.copy(ROOT / "config.example.toml", path)
    path.chmod(0o640)
    shutil.copytree(ROOT / "rules", tmp_path / "rules")
    (tmp_path / "mail.eml").write_bytes(MAIL)
    return path


def run(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: Any, stdin: bytes = b""
) -> tuple[int, str, str]:
    """main() in this process (fast); an exception escaping it fails the test by itself."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    monkeypatch.delenv("GATEWAY_CONFIG", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse: --help, --version, usage errors
        rc = int(exc.code or 0)
    out, err = capsys.readouterr()
    return rc, out, err


# (argv with {cfg} and {dir}, stdin, exit code, a piece of the one stderr line)
BAD_INPUT: list[tuple[list[str], bytes, int, str]] = [
    ([], b"", 64, "required: COMMAND"),
    (["bogus"], b"", 64, "invalid choice: 'bogus'"),
    (["check", "--bogus"], b"", 64, "unrecognized arguments: --bogus"),
    (["run", "-c", "{dir}/missing.toml"], b"", 1, "cannot read file"),
    (["check", "-c", "{dir}/missing.toml"], b"", 1, "missing.toml: cannot read file"),
    (["check", "-c", "{cfg}", "--unit", "{dir}/none.service"], b"", 66, "--unit: no such file"),
    (["route", "-c", "{cfg}", "{dir}/nonexistent.eml"], b"", 66, "cannot read"),
    (["route", "-c", "{cfg}", "--at", "bogus", "{dir}/mail.eml"], b"", 64, "not an ISO time"),
    (["route", "-c", "{cfg}", "--rcpt", "nobody", "{dir}/mail.eml"], b"", 64, "not an e-mail"),
    (["route", "-c", "{cfg}", "--intake", "fax", "{dir}/mail.eml"], b"", 64, "unknown intake"),
    (["route", "-c", "{cfg}"], b"", 64, "required: MESSAGE"),
    (["deliver", "-c", "{cfg}"], MAIL, 64, "required: --rcpt"),
    (["deliver", "-c", "{cfg}", "--rcpt", "x@elsewhere.example"], MAIL, 67, "not accepted"),
    (["deliver", "-c", "{cfg}", "--rcpt", "support@example.com"], b"", 65, "empty input"),
    (["deliver", "-c", "{cfg}", "--rcpt", "support@example.com"], b"garbage\n", 65, "header"),
    (["deliver", "-c", "{dir}/missing.toml", "--rcpt", "a@b.c"], MAIL, 75, "cannot read file"),
    (["queue", "-c", "{cfg}"], b"", 64, "required: SUBCOMMAND"),
    (["queue", "-c", "{cfg}", "ls", "--state", "bogus"], b"", 64, "invalid choice: 'bogus'"),
    (["queue", "-c", "{cfg}", "show", "abc"], b"", 64, "not a message id"),
    (["queue", "-c", "{cfg}", "show", "99"], b"", 1, "no message 99"),
    (["queue", "-c", "{cfg}", "retry", "99"], b"", 1, "no deferred or dead message 99"),
    (["queue", "-c", "{cfg}", "retry"], b"", 64, "one of the arguments"),
    (["queue", "-c", "{cfg}", "drop", "99"], b"", 1, "no message 99"),
    (["queue", "-c", "{cfg}", "stats", "--bogus"], b"", 64, "unrecognized"),
    (["spool", "-c", "{cfg}"], b"", 64, "required: SUBCOMMAND"),
    (["spool", "-c", "{cfg}", "backup", "{dir}/no/such/dir/x"], b"", 1, "No such file"),
    (["erase", "-c", "{cfg}", "--address", "bogus"], b"", 64, "not an e-mail address"),
    (["erase", "-c", "{cfg}", "--address", "a@example.org"], b"", 1, "no spool"),
    (["simulate", "--listen", "bogus"], b"", 64, "expected IP:PORT"),
    (["simulate", "--listen", "192.0.2.1:1"], b"", 1, "cannot listen"),
]


@pytest.mark.parametrize(("argv", "stdin", "code", "says"), BAD_INPUT)
def test_bad_input_gives_one_line_and_the_documented_code(
    cfg: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: Any,
    argv: list[str],
    stdin: bytes,
    code: int,
    says: str,
) -> None:
    args = [a.format(cfg=cfg, dir=cfg.parent) for a in argv]
    if argv[:1] in (["queue"], ["spool"]):  # an empty spool, as the daemon leaves it
        import asyncio

        from gateway.spool.sqlite import SqliteSpool

        async def empty_spool() -> None:
            await SqliteSpool(cfg.parent / "var" / "gateway.sqlite").close()

        asyncio.run(empty_spool())
    rc, out, err = run(args, capsys, monkeypatch, stdin)
    lines = err.splitlines()
    assert rc == code, err
    assert len(lines) == 1, err
    assert says in lines[0]
    assert "Traceback" not in err + out
    # every code a command can give is in the help
    assert f"  {code}" in EXIT_CODES or code in (65, 67, 75)


def test_the_daemons_spool_is_never_created_by_a_refused_command(
    cfg: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    for argv in (["queue", "ls"], ["deliver", "--rcpt", "nobody@elsewhere.example"]):
        run(["-c", str(cfg), *argv], capsys, monkeypatch, MAIL)
    assert not (cfg.parent / "var").exists()


def test_a_subprocess_shows_no_traceback_either(cfg: Path) -> None:
    """The real entry point (python -m gateway): argparse, the handlers, the exit code."""
    r = subprocess.run(
        [sys.executable, "-m", "gateway", "route", "-c", str(cfg), "/nonexistent.eml"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 66
    assert (
        r.stderr.strip() == "gateway route: cannot read /nonexistent.eml: No such file or directory"
    )


def test_version(capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    rc, out, _ = run(["--version"], capsys, monkeypatch)
    assert rc == 0
    assert out.strip() == f"gateway (ticket-gateway) {__version__}"


def test_version_matches_the_package_metadata() -> None:
    from importlib.metadata import version

    assert version("ticket-gateway") == __version__


@pytest.mark.parametrize("before", [True, False])
def test_config_before_or_after_the_command(
    cfg: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any, before: bool
) -> None:
    argv = ["-c", str(cfg), "check"] if before else ["check", "-c", str(cfg)]
    rc, out, err = run(argv, capsys, monkeypatch)
    assert rc == 0, err
    assert f"{cfg}: ok" in out
    argv = ["-c", str(cfg), "queue", "ls"] if before else ["queue", "ls", "-c", str(cfg)]
    rc, _, err = run(argv, capsys, monkeypatch)
    assert "no spool at" in err  # the config was read: its spool path is named


def test_help_hides_internal_commands_and_documents_every_option() -> None:
    parser = build_parser()
    text = parser.format_help()
    assert "_worker" not in text and "SUPPRESS" not in text
    assert "exit codes" in text and "examples:" in text

    def walk(p: Any, name: str) -> None:
        for action in p._actions:  # argparse offers no public walk over a parser's options
            if action.help is None and not action.option_strings == []:
                raise AssertionError(f"{name} {action.option_strings}: no help text")
            if action.choices and hasattr(action, "_name_parser_map"):
                for sub, sp in action.choices.items():
                    walk(sp, f"{name} {sub}")
        if name != "gateway" and " " not in name[len("gateway ") :]:
            assert "examples:" in (p.epilog or ""), name
            assert "exit codes:" in (p.epilog or ""), name

    walk(parser, "gateway")


def test_worker_command_still_runs_for_the_daemon(
    capsys: pytest.CaptureFixture[str], monkeypatch: Any, tmp_path: Path
) -> None:
    rc, _, err = run(["_worker", "-c", str(tmp_path / "none.toml")], capsys, monkeypatch)
    assert rc == 1 and "cannot read file" in err


def test_route_reads_stdin(cfg: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any) -> None:
    import json

    rc, out, err = run(["route", "-c", str(cfg), "--json", "-"], capsys, monkeypatch, MAIL)
    assert rc == 0, err
    assert json.loads(out)["backend"] == "superoffice-soap"


def test_deliver_refuses_a_recipient_smtp_refuses(
    cfg: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    rc, _, err = run(
        [
            "deliver",
            "-c",
            str(cfg),
            "--rcpt",
            "support@example.com",
            "--rcpt",
            "carol@elsewhere.example",
        ],
        capsys,
        monkeypatch,
        MAIL,
    )
    assert rc == 67
    assert err.strip() == (
        "gateway deliver: <carol@elsewhere.example>: recipient address not accepted here"
        " (not in [smtp] recipients)"
    )
    assert not (cfg.parent / "var").exists()
    # an accepted one (any case) is stored, with the recipient as SMTP would record it
    rc, _, err = run(
        ["deliver", "-c", str(cfg), "--rcpt", "Support@Example.com", "--from", "<>"],
        capsys,
        monkeypatch,
        MAIL,
    )
    assert rc == 0, err
    rc, out, _ = run(["queue", "-c", str(cfg), "show", "1"], capsys, monkeypatch)
    assert '"support@example.com"' in out and '"mail_from": ""' in out


def _with_secret_files(cfg: Path) -> None:
    text = cfg.read_text()
    text = text.replace('secret = "demo-secret"', 'secret_file = "whmcs-secret"', 1)
    cfg.write_text(text)


def _line(path: Path, needle: str) -> int:
    return next(n for n, ln in enumerate(path.read_text().splitlines(), 1) if needle in ln)


def test_check_names_the_variable_to_set_for_a_credential(
    cfg: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    _with_secret_files(cfg)
    monkeypatch.setattr("gateway.secrets.UNIT_DIRS", (str(cfg.parent / "no-units"),))
    rc, _, err = run(["check", "-c", str(cfg)], capsys, monkeypatch)
    assert rc == 1
    (line,) = err.splitlines()
    n = _line(cfg, 'secret_file = "whmcs-secret"')
    assert line.startswith(f"{cfg}:{n}: backends.whmcs.secret_file: cannot read secret file ")
    assert "set CREDENTIALS_DIRECTORY" in line
    assert ":0:" not in line and line.count("backends.whmcs") == 1


def test_check_finds_credentials_through_the_units_load_credential(
    cfg: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any, tmp_path: Path
) -> None:
    _with_secret_files(cfg)
    creds = tmp_path / "credentials"
    creds.mkdir(mode=0o700)
    (creds / "whmcs-secret").write_text("demo-secret\n")
    (creds / "whmcs-secret").chmod(0o600)
    unit = tmp_path / "ticket-gateway.service"
    unit.write_text(
        f"[Service]\n#LoadCredential=x:/nowhere\nLoadCredential=whmcs-secret:{creds}/whmcs-secret\n"
    )
    rc, out, err = run(["check", "-c", str(cfg), "--unit", str(unit)], capsys, monkeypatch)
    assert rc == 0, err
    assert "ok: 4 backends" in out
    # the same found in the unit's usual place, with a drop-in naming the directory instead
    sysdir = tmp_path / "etc-systemd"
    (sysdir / "ticket-gateway.service.d").mkdir(parents=True)
    (sysdir / "ticket-gateway.service").write_text("[Service]\nExecStart=/usr/bin/gateway run\n")
    (sysdir / "ticket-gateway.service.d" / "creds.conf").write_text(
        f"[Service]\nLoadCredential=secrets:{creds}\n"
    )
    cfg.write_text(cfg.read_text().replace('"whmcs-secret"', '"secrets_whmcs-secret"'))
    monkeypatch.setattr("gateway.secrets.UNIT_DIRS", (str(sysdir),))
    rc, out, err = run(["check", "-c", str(cfg)], capsys, monkeypatch)
    assert rc == 0, err
    # and $CREDENTIALS_DIRECTORY, when set, is where a bare name is looked up
    monkeypatch.setattr("gateway.secrets.UNIT_DIRS", (str(tmp_path / "none"),))
    os.environ["CREDENTIALS_DIRECTORY"] = str(creds)
    try:
        (creds / "secrets_whmcs-secret").write_text("demo-secret\n")
        rc2 = main(["check", "-c", str(cfg)])
    finally:
        del os.environ["CREDENTIALS_DIRECTORY"]
    assert rc2 == 0, capsys.readouterr().err


def test_check_reports_a_bad_time_zone_at_its_line(
    cfg: Path, capsys: pytest.CaptureFixture[str], monkeypatch: Any
) -> None:
    cfg.write_text(cfg.read_text().replace('"Europe/Berlin"', '"Mars/Olympus"', 1))
    rc, _, err = run(["check", "-c", str(cfg)], capsys, monkeypatch)
    assert rc == 1
    n = _line(cfg, "Mars/Olympus")
    assert err.splitlines() == [
        f"{cfg}:{n}: gateway.timezone: unknown time zone 'Mars/Olympus'"
        " (an IANA name such as Europe/Berlin or UTC)"
    ]
