"""A private Dovecot for the IMAP intake tests (a helper module, not a test).

`DovecotServer.create()` writes its own dovecot.conf into a fresh directory (base_dir, state,
Maildir, logs, TLS files all under it; the system's /etc/dovecot is neither read nor started),
with a passwd-file user, a plain/STARTTLS listener and an IMAPS listener on free loopback ports,
and a self-signed CA plus a server certificate for 127.0.0.1/localhost made with openssl.

Facts this relies on (../shared/notes/real-peers.md):
- Dovecot refuses mail processes as root or below `first_valid_uid`: the Maildir belongs to a
  system user (`gwmail`, created with useradd when missing) and the directory is 0755 so the auth
  and mail processes can read the users files and reach the Maildir.
- The master runs in the foreground (`-F`) as our own child with stdin/stdout/stderr detached
  (</dev/null >>log 2>&1): it never holds the test runner's captured stderr, and `wait()` reaps it,
  so no zombie is left behind. Its children (imap, imap-login, auth) may linger as zombies of the
  non-reaping PID 1 on these machines, so "is it gone" reads /proc/PID/stat, never `kill -0`.
- `ensure_dovecot()` installs the Debian package `dovecot-imapd` when it is missing and we are root
  (apt-get install; apt-get update and again when that fails), with a temporary policy-rc.d so that
  the package's system service is not started. It raises `DovecotUnavailable` with a clear message
  otherwise; the fixture turns that into a failure (never a skip: CI must not pass without it).

Messages are put into mailboxes with the stdlib `imaplib` (a reference client, not the code under
test).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import http.server
import imaplib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

DOVECOT = "/usr/sbin/dovecot"
DOVEADM = "/usr/bin/doveadm"
MAIL_USER = "gwmail"
PACKAGE = "dovecot-imapd"


class DovecotUnavailable(RuntimeError):
    """Dovecot is not installed and could not be installed here."""


# -- installation -----------------------------------------------------------------------------


def _apt(args: list[str], log: list[str]) -> bool:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    proc = subprocess.run(
        ["apt-get", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    log.append(f"$ apt-get {' '.join(args)} -> exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return proc.returncode == 0


@contextlib.contextmanager
def _no_service_start() -> Iterator[None]:
    """Debian's policy-rc.d convention: exit 101 = "do not start services" during the install."""
    policy = Path("/usr/sbin/policy-rc.d")
    created = False
    if not policy.exists():
        try:
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            created = True
        except OSError:
            pass
    try:
        yield
    finally:
        if created:
            with contextlib.suppress(OSError):
                policy.unlink()


def _missing() -> list[str]:
    missing = []
    if not (Path(DOVECOT).exists() and Path(DOVEADM).exists()):
        missing.append(PACKAGE)
    if shutil.which("openssl") is None:
        missing.append("openssl")  # makes the test CA and server certificate
    return missing


def ensure_dovecot() -> None:
    """Make sure Dovecot (and openssl) are there, installing the Debian packages if we can."""
    need = _missing()
    if not need:
        return
    if os.geteuid() != 0:
        raise DovecotUnavailable(
            f"{' and '.join(need)} missing and the tests do not run as root, so they cannot "
            f"install it: run `apt-get install -y {' '.join(need)}` and run the tests again"
        )
    if shutil.which("apt-get") is None:
        raise DovecotUnavailable(f"{' and '.join(need)} missing and there is no apt-get")
    log: list[str] = []
    # One installer at a time (pytest-xdist workers share the machine).
    with open("/tmp/ticket-gateway-dovecot-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        need = _missing()
        if not need:
            return
        with _no_service_start():
            ok = _apt(["install", "-y", "--no-install-recommends", *need], log)
            if not ok:
                _apt(["update"], log)
                _apt(["install", "-y", "--no-install-recommends", *need], log)
        need = _missing()
    if need:
        raise DovecotUnavailable(
            f"could not install {' '.join(need)} with apt-get:\n" + "\n".join(log)
        )


def ensure_mail_user() -> tuple[int, int]:
    """uid/gid of the system user that owns the test Maildirs (created when missing)."""
    import pwd

    try:
        pw = pwd.getpwnam(MAIL_USER)
    except KeyError:
        subprocess.run(
            [
                "useradd",
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                MAIL_USER,
            ],
            check=False,
            capture_output=True,
        )
        try:
            pw = pwd.getpwnam(MAIL_USER)
        except KeyError as exc:
            raise DovecotUnavailable(f"cannot create the system user {MAIL_USER!r}") from exc
    return pw.pw_uid, pw.pw_gid


# -- helpers ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc_gone(pid: int) -> bool:
    """True when PID has exited: no /proc entry, or a zombie (state Z) nobody reaps."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state is the field after the parenthesised command name (which may contain spaces).
    state = stat.rsplit(")", 1)[1].split()[0]
    return state in ("Z", "X")


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


def make_tls(directory: Path) -> tuple[Path, Path, Path]:
    """A throw-away CA and a server certificate for 127.0.0.1 and localhost (EC P-256)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = directory / "ca.key", directory / "ca.crt"
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    ext = directory / "server.ext"
    ext.write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    cmds = [
        [
            "openssl",
            "req",
            "-x509",
            *ec,
            "-keyout",
            ca_key,
            "-out",
            ca_crt,
            "-days",
            "3",
            "-subj",
            "/CN=ticket-gateway test CA",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            ca_crt,
            "-CAkey",
            ca_key,
            "-CAcreateserial",
            "-out",
            crt,
            "-days",
            "3",
            "-extfile",
            ext,
        ],
    ]
    for cmd in cmds:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"openssl failed: {' '.join(map(str, cmd))}\n{proc.stderr}")
    return ca_crt, crt, key


CONF = """\
# Private test instance: everything under {root}
base_dir = {root}/run
state_dir = {root}/state
instance_name = gw-test-{port}
log_path = {root}/logs/dovecot.log
info_log_path = {root}/logs/dovecot.log
debug_log_path = {root}/logs/dovecot.log
protocols = imap
listen = 127.0.0.1
shutdown_clients = yes
ssl = yes
ssl_cert = <{root}/tls/server.crt
ssl_key = <{root}/tls/server.key
disable_plaintext_auth = no
auth_mechanisms = plain login{oauth2_mechanisms}
auth_failure_delay = 1 secs
first_valid_uid = {uid}
mail_uid = {uid}
mail_gid = {gid}
mail_location = maildir:{root}/mail/%u/Maildir
mail_fsync = never
mailbox_idle_check_interval = 1 secs
{oauth2_passdb}passdb {{
  driver = passwd-file
  mechanisms = plain login
  args = scheme=PLAIN username_format=%u {root}/users.d/%u
}}
userdb {{
  driver = static
  args = uid={uid} gid={gid} home={root}/mail/%u allow_all_users=yes
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {ssl_port}
    ssl = yes
  }}
}}
service stats {{
  unix_listener stats-reader {{
    mode = 0600
  }}
  unix_listener stats-writer {{
    mode = 0666
  }}
}}
{extra}
"""


OAUTH2_PASSDB = """\
passdb {{
  driver = oauth2
  mechanisms = xoauth2 oauthbearer
  args = {root}/oauth2.conf.ext
}}
"""


class TokenIntrospection:
    """An OAuth2 token introspection endpoint (RFC 7662) on loopback for Dovecot's oauth2 passdb.

    `tokens` maps an access token to the username it is valid for; `calls` counts lookups.
    """

    def __init__(self) -> None:
        self.tokens: dict[str, str] = {}
        self.calls = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                token = (form.get("token") or [""])[0]
                owner.calls += 1
                user = owner.tokens.get(token)
                body = json.dumps({"active": True, "username": user} if user else {"active": False})
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/introspect"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass(eq=False)
class DovecotServer:
    """One private Dovecot; `start`/`stop`/`restart` keep the same ports and mail."""

    root: Path
    port: int  # plain, with STARTTLS offered
    ssl_port: int  # implicit TLS (IMAPS)
    extra_conf: str = ""
    proc: subprocess.Popen[bytes] | None = None
    ca_file: Path = field(init=False)  # the CA that signed the server certificate
    host: str = "127.0.0.1"

    @classmethod
    def create(
        cls, *, extra_conf: str = "", oauth2_url: str | None = None, start: bool = True
    ) -> DovecotServer:
        """A new server; with `oauth2_url`, XOAUTH2 is checked by that introspection URL."""
        ensure_dovecot()
        uid, gid = ensure_mail_user()
        # Not pytest's tmp_path: that sits in a 0700 directory the mail user cannot traverse.
        root = Path(tempfile.mkdtemp(prefix="gw-dovecot-"))
        root.chmod(0o755)
        server = cls(root=root, port=free_port(), ssl_port=free_port(), extra_conf=extra_conf)
        server.ca_file, _, _ = make_tls(root / "tls")
        for sub in ("run", "state", "logs"):
            (root / sub).mkdir()
        mail = root / "mail"
        mail.mkdir()
        os.chown(mail, uid, gid)
        (root / "users.d").mkdir()
        if oauth2_url:
            (root / "oauth2.conf.ext").write_text(
                f"introspection_mode = post\nintrospection_url = {oauth2_url}\n"
                "username_attribute = username\nactive_attribute = active\nactive_value = true\n"
            )
        (root / "dovecot.conf").write_text(
            CONF.format(
                root=root,
                port=server.port,
                ssl_port=server.ssl_port,
                uid=uid,
                gid=gid,
                extra=extra_conf,
                oauth2_mechanisms=" xoauth2 oauthbearer" if oauth2_url else "",
                oauth2_passdb=OAUTH2_PASSDB.format(root=root) if oauth2_url else "",
            )
        )
        if start:
            server.start()
        return server

    @property
    def conf(self) -> Path:
        return self.root / "dovecot.conf"

    @property
    def log_file(self) -> Path:
        return self.root / "logs" / "dovecot.log"

    def log_text(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        assert self.proc is None, "already running"
        start_log = self.root / "logs" / "start.log"
        with open(os.devnull, "rb") as devnull, open(start_log, "ab") as out:
            self.proc = subprocess.Popen(
                [DOVECOT, "-F", "-c", str(self.conf)],
                stdin=devnull,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        _running.add(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(
                    f"dovecot exited with {code} at start:\n{start_log.read_text()}\n"
                    f"{self.log_text()[-3000:]}"
                )
            if self._greets(self.port) and self._greets(self.ssl_port, tls=True):
                return
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"dovecot did not answer within {timeout}s:\n{self.log_text()[-3000:]}")

    def _greets(self, port: int, *, tls: bool = False) -> bool:
        try:
            with socket.create_connection((self.host, port), timeout=2) as sock:
                if tls:
                    ctx = ssl.create_default_context(cafile=str(self.ca_file))
                    with ctx.wrap_socket(sock, server_hostname=self.host) as tsock:
                        return tsock.recv(100).startswith(b"* OK")
                return sock.recv(100).startswith(b"* OK")
        except OSError:
            return False

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM to the whole process group, as a service manager does.

        Only signalling the master makes its imap processes linger for ~10 s on these machines
        before they say BYE; the group signal makes every process say BYE at once.
        """
        proc, self.proc = self.proc, None
        _running.discard(self)
        if proc is None:
            return
        children = _children_of(proc.pid)
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # start_new_session: pgid == master pid
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        # The master is reaped; its children were re-parented to PID 1, which may not reap them
        # (a zombie counts as gone).
        deadline = time.monotonic() + 5
        for pid in children:
            while not _proc_gone(pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            if not _proc_gone(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        # The listening ports must be free again before a restart binds them.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self._greets(self.port):
            time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def add_mailbox(self, username: str, password: str = "s3cret-pass") -> Mailbox:
        """Another account, usable at once (no restart)."""
        # One passwd-file per user (the passdb path has %u): a new account is a new file that
        # Dovecot has never cached, so it is known at once (appending to one shared file is
        # noticed only after Dovecot's own re-read delay).
        (self.root / "users.d" / username).write_text(f"{username}:{{PLAIN}}{password}::::::\n")
        return Mailbox(self, username, password)

    def doveadm(self, *args: str) -> str:
        proc = subprocess.run(
            [DOVEADM, "-c", str(self.conf), *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"doveadm {' '.join(args)} failed: {proc.stderr}")
        return proc.stdout


@dataclass
class Mailbox:
    """One account on a `DovecotServer`, read and written with the stdlib imaplib."""

    server: DovecotServer
    username: str
    password: str

    @contextlib.contextmanager
    def client(self) -> Iterator[imaplib.IMAP4]:
        imap = imaplib.IMAP4(self.server.host, self.server.port, timeout=30)
        try:
            imap.login(self.username, self.password)
            yield imap
        finally:
            with contextlib.suppress(Exception):
                imap.logout()

    def append(self, messages: Iterable[bytes], folder: str = "INBOX") -> None:
        with self.client() as imap:
            for raw in messages:
                typ, data = imap.append(_q(folder), None, None, raw)
                assert typ == "OK", data

    def create_folder(self, folder: str) -> None:
        with self.client() as imap:
            typ, data = imap.create(_q(folder))
            assert typ == "OK", data

    def folders(self) -> list[str]:
        with self.client() as imap:
            typ, data = imap.list()
            assert typ == "OK", data
        names = []
        for line in data:
            assert isinstance(line, bytes)
            m = re.match(rb'\(.*?\) (?:"[^"]*"|NIL) (.*)$', line)
            assert m is not None, line
            names.append(m[1].decode().strip('"'))
        return names

    def messages(self, folder: str = "INBOX") -> dict[int, tuple[set[str], bytes]]:
        """uid -> (flags, raw) of every message in `folder` (read without setting \\Seen)."""
        out: dict[int, tuple[set[str], bytes]] = {}
        with self.client() as imap:
            typ, data = imap.select(_q(folder), readonly=True)
            assert typ == "OK", data
            typ, data = imap.uid("SEARCH", "ALL")
            assert typ == "OK", data
            raw_uids = data[0]
            assert isinstance(raw_uids, bytes)
            for uid in raw_uids.decode().split():
                typ, data = imap.uid("FETCH", uid, "(FLAGS BODY.PEEK[])")
                assert typ == "OK", data
                item = data[0]
                assert isinstance(item, tuple)
                head, body = item
                m = re.search(rb"FLAGS \(([^)]*)\)", head)
                assert m is not None, head
                flags = {f.decode() for f in re.findall(rb"\\\w+", m[1])}
                out[int(uid)] = (flags, bytes(body))
        return out

    def count(self, folder: str = "INBOX") -> int:
        with self.client() as imap:
            typ, data = imap.status(_q(folder), "(MESSAGES)")
            if typ != "OK":
                return 0
            line = data[0]
            assert isinstance(line, bytes)
            m = re.search(rb"MESSAGES (\d+)", line)
            assert m is not None
            return int(m[1])

    def uidvalidity(self, folder: str = "INBOX") -> int:
        with self.client() as imap:
            typ, data = imap.status(_q(folder), "(UIDVALIDITY)")
            assert typ == "OK", data
            line = data[0]
            assert isinstance(line, bytes)
            m = re.search(rb"UIDVALIDITY (\d+)", line)
            assert m is not None
            return int(m[1])

    def set_flags(self, folder: str, flags: str, *, add: bool) -> None:
        with self.client() as imap:
            imap.select(_q(folder))
            imap.uid("STORE", "1:*", "+FLAGS" if add else "-FLAGS", flags)

    def set_uidvalidity(self, folder: str, value: int) -> None:
        """What a restored backup or a rebuilt index does to a folder: a new UIDVALIDITY."""
        self.server.doveadm(
            "mailbox", "update", "-u", self.username, "--uid-validity", str(value), folder
        )


# Servers still running when the interpreter exits (a crashed script, an interrupted run) are
# stopped and removed then, so no Dovecot outlives the tests that started it.
_running: set[DovecotServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.cleanup()


def _q(folder: str) -> str:
    """imaplib sends mailbox names as given: quote them (test names are plain ASCII)."""
    return f'"{folder}"'


def make_message(
    n: int, *, subject: str | None = None, size: int = 0, headers: dict[str, str] | None = None
) -> bytes:
    """A small, unique test message (Message-ID <msg-N@test.example>)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    # Some bodies with unbalanced parentheses: aioimaplib counts them in FETCH responses.
    body = f"Message number {n}{' :)' if n % 2 else ''}.\r\n" + ("x" * 76 + "\r\n") * (size // 78)
    return (
        f"From: Customer {n} <customer{n}@example.org>\r\n"
        f"To: support@example.com\r\n"
        f"Subject: {subject or f'Help request {n}'}\r\n"
        f"Message-ID: <msg-{n}@test.example>\r\n"
        f"Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        f"{extra}"
        f"\r\n{body}"
    ).encode()
