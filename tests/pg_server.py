"""A private PostgreSQL cluster for the tests (no system service is used or started).

`ensure_postgres()` installs Debian's `postgresql` package when the binaries are missing (as root,
with services kept from starting, like the Dovecot fixture); `PostgresServer` runs `initdb` in a
temporary directory as the unprivileged `postgres` user (the server refuses to run as root), starts
it on its own port on 127.0.0.1 with its Unix socket in that directory, and creates one database
per test with `new_database()`. `stop()`/`start()` keep the data (the outage drill), and
`crash()` is `pg_ctl -m immediate`. Facts used: ../shared/notes/real-peers.md, "PostgreSQL".
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path

from tests.imap_server import _apt, _no_service_start

PACKAGE = "postgresql"
USER = "postgres"


class PostgresUnavailable(RuntimeError):
    """PostgreSQL is not installed and could not be installed here."""


def bindir() -> Path | None:
    root = Path("/usr/lib/postgresql")
    versions = sorted(
        (p for p in root.glob("*") if (p / "bin" / "initdb").exists()),
        key=lambda p: int(p.name) if p.name.isdigit() else 0,
    )
    return versions[-1] / "bin" if versions else None


def ensure_postgres() -> Path:
    """The server's bin directory, installing the Debian package if needed and allowed."""
    found = bindir()
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise PostgresUnavailable(
            "PostgreSQL is missing and the tests do not run as root, so they cannot install it:"
            f" run `apt-get install -y {PACKAGE}` and run the tests again"
        )
    log: list[str] = []
    with open("/tmp/ticket-gateway-postgres-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if bindir() is None:
            with _no_service_start():
                if not _apt(["install", "-y", "--no-install-recommends", PACKAGE], log):
                    _apt(["update"], log)
                    _apt(["install", "-y", "--no-install-recommends", PACKAGE], log)
    found = bindir()
    if found is None:
        raise PostgresUnavailable(f"could not install {PACKAGE} with apt-get:\n" + "\n".join(log))
    return found


def _ensure_user() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", USER],
            check=True,
            capture_output=True,
        )
        pw = pwd.getpwnam(USER)
    return pw.pw_uid, pw.pw_gid


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One private cluster: `start()`, `new_database()`, `stop()`/`start()`, `cleanup()`."""

    def __init__(self) -> None:
        self.bin = ensure_postgres()
        self.root = Path(tempfile.mkdtemp(prefix="gw-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            uid, gid = _ensure_user()
            os.chown(self.root, uid, gid)
            self.root.chmod(0o755)
            self._as_user = ["runuser", "-u", USER, "--"]
        self._run(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            USER,
            "--no-sync",
            "-E",
            "UTF8",
        )
        with open(self.data / "postgresql.conf", "a") as conf:
            # a test cluster: small, quick, and plenty of connections for several nodes
            conf.write("max_connections = 200\nshared_buffers = 32MB\nfsync = on\n")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*self._as_user, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=self.root,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def start(self) -> None:
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False
        )

    def crash(self) -> None:
        self.stop("immediate")

    @property
    def running(self) -> bool:
        return (
            self._run(
                str(self.bin / "pg_ctl"), "-D", str(self.data), "status", check=False
            ).returncode
            == 0
        )

    def psql(self, query: str, db: str = "postgres") -> str:
        return self._run(
            str(self.bin / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(self.port),
            "-U",
            USER,
            "-d",
            db,
            "-Atc",
            query,
        ).stdout

    def new_database(self) -> str:
        """A fresh database; its URL (no password: the cluster trusts loopback)."""
        name = f"gw_{uuid.uuid4().hex[:12]}"
        self.psql(f"CREATE DATABASE {name}")
        return self.url(name)

    def url(self, db: str) -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{db}"

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "server.log").read_text(errors="replace")[-4000:]
        return ""

    def cleanup(self) -> None:
        if self.running:
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)
