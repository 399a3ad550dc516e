"""scripts/install into a temporary --root: the units pass `systemd-analyze verify --root`, the
installed `gateway --version` and `gateway check` run, an admin's files survive a second run (an
upgrade), and scripts/uninstall keeps config and spool unless --purge.

The root starts empty, as `scripts/install --root /tmp/r` on a fresh Debian host would find it:
`verify` resolves the units' dependencies and Exec*= programs inside the root, and the installer
gives a tree without systemd of its own what the units need (the host's target units, /bin/kill,
/bin/sh, /usr/bin/install), so the verify must pass with nothing added by the test. The
virtualenv inside the root names its final paths (/opt/ticket-gateway/venv/...), so the installed
script is run through the venv's interpreter at its place in the root.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import __version__

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/opt/ticket-gateway"
UNITS = [
    "ticket-gateway.service",
    "ticket-gateway.socket",
    "ticket-gateway-backup.service",
    "ticket-gateway-backup.timer",
]

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="installs a system user (root)")


def _install(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(REPO / "scripts/install"), *args], capture_output=True, text=True, timeout=1800
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (Debian: apt install systemd; scripts/test does)")
    r = tmp_path_factory.mktemp("root")  # empty
    proc = _install("--root", str(r))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "has no systemd of its own: added this host's systemd target units" in proc.stdout
    yield r


def installed_gateway(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    venv = root / PREFIX.lstrip("/") / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("GATEWAY_CONFIG", "PYTHONPATH")}
    return subprocess.run(
        [str(venv / "bin/python"), str(venv / "bin/gateway"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",  # not the checkout: the installed package must be the one imported
        env=env,
    )


def test_installed_units_pass_systemd_analyze_verify(root: Path) -> None:
    units = root / "usr/lib/systemd/system"
    proc = subprocess.run(
        ["systemd-analyze", "verify", f"--root={root}", *(str(units / u) for u in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_PAGER": ""},
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert output.strip() == "", output  # not one warning
    # what the installer added to the empty tree, in Debian's merged-/usr layout
    assert (root / "usr/lib/systemd/system/sysinit.target").is_file()
    assert os.readlink(root / "bin") == "usr/bin"
    for prog in ("usr/bin/kill", "usr/bin/sh", "usr/bin/install"):
        assert os.access(root / prog, os.X_OK), prog
    # the fixed-user drop-in is installed next to the unit and names the installed account
    dropin = units / "ticket-gateway.service.d/10-fixed-user.conf"
    assert "User=ticket-gateway" in dropin.read_text()
    assert "ticket-gateway:" in (root / "etc/passwd").read_text()


def test_installed_gateway_runs_version_and_check(root: Path) -> None:
    link = root / "usr/bin/gateway"
    assert os.readlink(link) == f"{PREFIX}/venv/bin/gateway"
    assert (
        (root / PREFIX.lstrip("/") / "venv/bin/gateway")
        .read_text()
        .startswith(f"#!{PREFIX}/venv/bin/python")
    )
    v = installed_gateway(root, "--version")
    assert v.returncode == 0, v.stderr
    assert v.stdout.strip() == f"gateway (ticket-gateway) {__version__}"
    where = installed_gateway(root, "-c", "/dev/null", "--help")
    assert where.returncode == 0
    conf = root / "etc/ticket-gateway/config.toml"
    c = installed_gateway(root, "check", "-c", str(conf))
    assert c.returncode == 0, c.stderr
    assert "ok: 4 backends" in c.stdout
    assert 'path = "/var/lib/ticket-gateway/spool.sqlite"' in conf.read_text()


def test_modes_owners_and_docs(root: Path) -> None:
    state = root / "var/lib/ticket-gateway"
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    conf = root / "etc/ticket-gateway/config.toml"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o640
    uid = next(
        int(line.split(":")[2])
        for line in (root / "etc/passwd").read_text().splitlines()
        if line.startswith("ticket-gateway:")
    )
    assert state.stat().st_uid == uid
    assert (root / "etc/ticket-gateway/rules/10-demo.toml").is_file()
    assert (root / "etc/logrotate.d/ticket-gateway").is_file()
    doc = root / "usr/share/doc/ticket-gateway"
    for name in ("README.md", "LICENSE", "config.example.toml", "systemd/README.md"):
        assert (doc / name).is_file(), name
    # the units' Documentation= points at an installed file
    unit = (root / "usr/lib/systemd/system/ticket-gateway.service").read_text()
    assert "Documentation=file:///usr/share/doc/ticket-gateway/README.md" in unit


def test_second_run_keeps_the_admins_files_and_uninstall_keeps_the_spool(root: Path) -> None:
    conf = root / "etc/ticket-gateway/config.toml"
    conf.write_text(conf.read_text().replace("workers = 16", "workers = 7"))
    rule = root / "etc/ticket-gateway/rules/10-demo.toml"
    rule.unlink()  # an admin removed a demo rule: it must not come back
    spool = root / "var/lib/ticket-gateway/spool.sqlite"
    spool.write_bytes(b"not really a spool")
    venv_cfg = root / PREFIX.lstrip("/") / "venv/pyvenv.cfg"
    before = venv_cfg.stat().st_mtime_ns
    proc = _install("--root", str(root))
    assert proc.returncode == 0, proc.stderr
    assert "up to date" in proc.stdout  # same checkout: the venv is not rebuilt
    assert venv_cfg.stat().st_mtime_ns == before
    assert "workers = 7" in conf.read_text()
    assert not rule.exists()
    assert spool.read_bytes() == b"not really a spool"

    out = subprocess.run(
        [str(REPO / "scripts/uninstall"), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert not (root / "usr/bin/gateway").exists()
    assert not (root / PREFIX.lstrip("/")).exists()
    assert not (root / "usr/lib/systemd/system/ticket-gateway.service").exists()
    assert conf.exists() and spool.exists()
    out = subprocess.run(
        [str(REPO / "scripts/uninstall"), "--root", str(root), "--purge"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert not conf.exists() and not spool.parent.exists()
    assert "ticket-gateway:" not in (root / "etc/passwd").read_text()
