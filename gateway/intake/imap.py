"""IMAP intake (aioimaplib): fetch mail from hosted mailboxes; move, flag or delete it only after
the spool commit.

One `ImapIntake` per `[[imap]]` section. Its `run()` keeps one connection per watched folder
(an IMAP connection has one folder selected, and IDLE watches only that one), so a section with
`folders = ["INBOX", "Spam"]` holds two connections; different sections run as different tasks.

Per connection: connect (implicit TLS, STARTTLS or plain-to-loopback; certificates verified by
default, against `ca_file` alone when it is set), LOGIN or AUTHENTICATE XOAUTH2 (the token is read
from a file or produced by a command on every connection, so a refreshed token is picked up),
create `move_to` when missing, SELECT the folder and read its UIDVALIDITY. Then rounds:

1. `UID SEARCH` for what is not yet handled: `UNSEEN UNDELETED` with `after = "seen"`, otherwise
   `UNDELETED` (everything still in the folder; handled mail has left it).
2. In chunks of `batch` UIDs (their source keys looked up in the spool in one query): a UID
   whose source key `imap:{name}:{folder}:{uidvalidity}:{uid}` is already in the spool is not
   fetched again, only given its after-action (this completes a move that a crash
   interrupted, without a second ticket). The others are fetched with
   `UID FETCH (UID BODY.PEEK[])` (PEEK: fetching never sets \\Seen), stored with `spool.put`, and
   only when every put of the chunk has returned (durable) is the after-action applied to them:
   `UID MOVE` (or COPY + STORE \\Deleted + (UID) EXPUNGE without MOVE), STORE +FLAGS \\Seen, or
   STORE \\Deleted + (UID) EXPUNGE. A crash anywhere in between leaves the mail in the folder,
   and the next round either stores it or (key known) just finishes the action.
3. A `SpoolError` leaves the chunk's unstored mail untouched (no flag, no move); the intake shows
   itself down with the reason and tries again with backoff on the same connection.
4. Then IDLE where the server offers it, re-issued every `idle_timeout` (before the 29-minute
   limit of RFC 2177 servers); `EXISTS`/`RECENT` ends it at once and a new round starts. Without
   IDLE the folder is searched again every `poll_interval` seconds.

UIDVALIDITY: the source keys contain it, so after a change every UID is a new key and mail still
in the folder is stored again. That is on purpose (after a UIDVALIDITY change the old UIDs mean
nothing); the duplicates are caught later by the worker, which de-duplicates by Message-ID and
content. The change is logged (`event=imap_uidvalidity_changed`).

Failures: any connection or protocol error drops the connection and reconnects with exponential
backoff and jitter (capped at `retry_cap`); after `down_after` consecutive failures the status
component is set down with the reason (shown in /healthz) and set ok again once a folder is
selected. Refused credentials (or a token that cannot be obtained) and a certificate that does
not verify are reported at once (`event=imap_login_failed`, `event=imap_tls_failed`) and retried
slowly (from `login_retry` seconds, doubling up to `retry_cap`): no crash loop, no tight loop.

Too large mail (`max_size`, read with RFC822.SIZE before the fetch) is left in the folder for a
human and logged once. The envelope is what the mailbox knows: mail-from is the Return-Path
header ("" when there is none), the recipients are the X-Original-To headers, else the topmost
Delivered-To, else the username. Logger `gateway.intake.imap`, one key=value event per line,
never a password, token or message content (aioimaplib's own logger, which would log bytes on
the wire at DEBUG, is set to WARNING unless the application configured it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.parser
import email.utils
import ipaddress
import logging
import re
import shlex
import socket
import ssl
import time
from collections.abc import Awaitable, Iterable, Sequence
from email.policy import compat32
from pathlib import Path
from typing import Any, Literal, TypeVar

import aioimaplib
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway import retry
from gateway.errors import GatewayError, SpoolError
from gateway.models import Envelope
from gateway.secrets import SecretError, resolve_secret
from gateway.spool.base import Spool
from gateway.status import Component

log = logging.getLogger("gateway.intake.imap")

T = TypeVar("T")

# Memory bound of one FETCH round trip, besides the `batch` count (one message may exceed it).
BATCH_BYTES = 32 * 1024 * 1024
_NEWS_RE = re.compile(rb"^\* \d+ (EXISTS|RECENT)\b", re.IGNORECASE)
_FETCH_START_RE = re.compile(rb"^(?:\* )?\d+ FETCH \(", re.IGNORECASE)
_UID_RE = re.compile(rb"\bUID (\d+)", re.IGNORECASE)
_SIZE_RE = re.compile(rb"\bRFC822\.SIZE (\d+)", re.IGNORECASE)
_UIDVALIDITY_RE = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)


# -- config -------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class ImapConfig(BaseModel):
    """One `[[imap]]` section: a mailbox to fetch mail from."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)  # the intake name rules can match
    host: str = Field(min_length=1)
    port: int | None = Field(None, ge=1, le=65535)  # default: 993 for tls, 143 otherwise
    security: Literal["tls", "starttls", "plain"] = "tls"  # plain only towards loopback
    verify: bool = True  # verify the server certificate (and host name)
    ca_file: str | None = None  # trust only this CA bundle instead of the system's
    username: str = Field(min_length=1)
    password: SecretStr | None = None
    password_file: str | None = None  # a bare name is looked up in $CREDENTIALS_DIRECTORY first
    password_env: str | None = None
    auth: Literal["password", "xoauth2"] = "password"
    oauth2_token_file: str | None = None  # XOAUTH2 access token, re-read on every connection
    oauth2_token_command: str | list[str] | None = None  # prints the token on stdout
    folders: list[str] = Field(default_factory=lambda: ["INBOX"], min_length=1)
    after: Literal["move", "seen", "delete"] = "move"  # what happens once a mail is stored
    move_to: str = "Processed"  # created when missing
    poll_interval: float = Field(60.0, gt=0)  # seconds between searches without IDLE
    idle_timeout: float = Field(25 * 60.0, gt=0, le=29 * 60.0)  # IDLE is re-issued after this
    batch: int = Field(50, ge=1, le=1000)  # messages fetched per round trip
    max_size: int = Field(50 * 1024 * 1024, ge=1024)  # larger mail is left in the folder
    timeout: float = Field(60.0, gt=0)  # seconds for connecting and for each command

    @field_validator("name")
    @classmethod
    def _name_ok(cls, v: str) -> str:
        if ":" in v or any(c.isspace() for c in v):
            raise ValueError("an imap name must not contain ':' or white space")
        return v

    @field_validator("folders")
    @classmethod
    def _folders_ok(cls, v: list[str]) -> list[str]:
        if any(not f.strip() for f in v):
            raise ValueError("folder names must not be empty")
        if len(set(v)) != len(v):
            raise ValueError("folders must not repeat")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> ImapConfig:
        if self.security == "plain" and not _is_loopback(self.host):
            raise ValueError(
                f'security = "plain" is refused towards {self.host!r}: it would send the '
                'password in clear; use "tls" or "starttls" (plain is only for loopback)'
            )
        if self.port is None:
            self.port = 993 if self.security == "tls" else 143
        secrets = [k for k in ("password", "password_file", "password_env") if getattr(self, k)]
        tokens = [k for k in ("oauth2_token_file", "oauth2_token_command") if getattr(self, k)]
        if self.auth == "password":
            if not secrets:
                raise ValueError("set one of password, password_file or password_env")
            if len(secrets) > 1:
                raise ValueError(f"set only one of {', '.join(secrets)}")
            if tokens:
                raise ValueError(f'{tokens[0]} needs auth = "xoauth2"')
        else:
            if len(tokens) != 1:
                raise ValueError(
                    'auth = "xoauth2" needs exactly one of oauth2_token_file or '
                    "oauth2_token_command"
                )
            if secrets:
                raise ValueError(f'{secrets[0]} is not used with auth = "xoauth2"')
        if self.after == "move":
            if not self.move_to.strip():
                raise ValueError("move_to must not be empty")
            if self.move_to in self.folders:
                raise ValueError(f"move_to {self.move_to!r} is also a watched folder")
        return self

    def server_port(self) -> int:
        return self.port or (993 if self.security == "tls" else 143)


# -- errors -------------------------------------------------------------------------------------


class ImapError(GatewayError):
    """The connection broke or a command failed: drop the connection and reconnect."""


class ImapLoginError(ImapError):
    """Credentials refused, or the password/token could not be obtained: retry slowly."""


class ImapTlsError(ImapError):
    """The server certificate did not verify (or the CA file cannot be read): retry slowly."""


class _SpoolBlocked(Exception):
    def __init__(self, cause: SpoolError) -> None:
        super().__init__(str(cause))
        self.cause = cause


# -- small helpers ------------------------------------------------------------------------------


def _imap_utf7(name: str) -> str:
    """Mailbox name in IMAP's modified UTF-7 (RFC 3501 5.1.3)."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            b64 = base64.b64encode("".join(pending).encode("utf-16-be")).decode()
            out.append("&" + b64.rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for ch in name:
        if 0x20 <= ord(ch) <= 0x7E:
            flush()
            out.append("&-" if ch == "&" else ch)
        else:
            pending.append(ch)
    flush()
    return "".join(out)


def _mailbox_arg(name: str) -> str:
    return aioimaplib.quoted(_imap_utf7(name))


def uid_set(uids: Iterable[int]) -> str:
    """`1:3,7,9:10` for [1, 2, 3, 7, 9, 10]."""
    parts: list[str] = []
    run: list[int] = []
    for uid in sorted(set(uids)):
        if run and uid == run[-1] + 1:
            run.append(uid)
            continue
        if run:
            parts.append(f"{run[0]}:{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [uid]
    if run:
        parts.append(f"{run[0]}:{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(parts)


def parse_fetch(lines: Sequence[Any]) -> list[tuple[bytes, bytes | None]]:
    """Split aioimaplib FETCH response lines into (attribute text, literal or None) per message.

    aioimaplib gives header lines as `bytes` and literal data as `bytearray`; a message whose
    body has unbalanced parentheses makes it keep the `* ` prefix on the following lines.
    """
    entries: list[tuple[bytes, bytes | None]] = []
    text: bytes | None = None
    literal: bytes | None = None
    for item in lines:
        if isinstance(item, bytearray):
            if text is not None and literal is None:
                literal = bytes(item)
            continue
        if not isinstance(item, bytes):
            continue
        if _FETCH_START_RE.match(item):
            if text is not None:
                entries.append((text, literal))
            text, literal = item, None
        elif text is not None:
            text += b" " + item
    if text is not None:
        entries.append((text, literal))
    return entries


def _response_text(resp: Any) -> str:
    lines = getattr(resp, "lines", None) or [b""]
    last = lines[-1]
    if isinstance(last, bytes | bytearray):
        return bytes(last).decode("utf-8", "replace")[:200]
    return str(last)[:200]


def _address(value: str) -> str:
    _, addr = email.utils.parseaddr(value)
    return addr.strip().lower()


def envelope_fields(raw: bytes, username: str) -> tuple[str, tuple[str, ...]]:
    """(mail_from, rcpt_tos) from the delivery headers the mailbox's server added."""
    end = raw.find(b"\r\n\r\n")
    if end < 0:
        end = raw.find(b"\n\n")
    head = raw if end < 0 else raw[:end]
    headers = email.parser.BytesHeaderParser(policy=compat32).parsebytes(head + b"\r\n\r\n")
    mail_from = ""
    return_path = headers.get_all("Return-Path") or []
    if return_path:
        mail_from = _address(str(return_path[0]))
    rcpts: list[str] = []
    for value in headers.get_all("X-Original-To") or []:
        addr = _address(str(value))
        if addr and addr not in rcpts:
            rcpts.append(addr)
    if not rcpts:
        delivered = headers.get_all("Delivered-To") or []
        if delivered and _address(str(delivered[0])):
            rcpts.append(_address(str(delivered[0])))
    if not rcpts:
        rcpts.append(username.lower() if "@" in username else username)
    return mail_from, tuple(rcpts)


async def _first(events: Sequence[asyncio.Event], seconds: float | None) -> None:
    """Wait until one of `events` is set or `seconds` pass."""
    if any(e.is_set() for e in events):
        return
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)


# -- the protocol hooks aioimaplib lacks --------------------------------------------------------


class _Protocol(aioimaplib.IMAP4ClientProtocol):
    """Notes EXISTS/RECENT whenever they arrive (aioimaplib drops them outside IDLE) and answers
    a SASL error challenge with an empty line so a refused XOAUTH2 ends in NO, not in a hang."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn_lost_cb: Any, news: asyncio.Event):
        super().__init__(loop, conn_lost_cb)
        self.news = news
        self.last_uidvalidity = 0  # from SELECT, or an unsolicited OK [UIDVALIDITY] later

    def _untagged_response(self, line: bytes) -> Any:
        if _NEWS_RE.match(line):
            self.news.set()
        m = _UIDVALIDITY_RE.search(line)
        if m:
            self.last_uidvalidity = int(m[1])
        return super()._untagged_response(line)

    def _continuation(self, line: bytes) -> None:
        cmd = self.pending_sync_command
        if cmd is not None and cmd.name == "AUTHENTICATE":
            self.transport.write(b"\r\n")
            return
        super()._continuation(line)


class _Client(aioimaplib.IMAP4):
    def __init__(
        self,
        host: str,
        port: int,
        *,
        timeout: float,
        ssl_context: ssl.SSLContext | None,
        news: asyncio.Event,
        lost: asyncio.Event,
    ) -> None:
        self._news = news
        super().__init__(
            host,
            port,
            timeout=timeout,
            conn_lost_cb=lambda exc: lost.set(),
            ssl_context=ssl_context,
        )

    def create_client(
        self,
        host: str,
        port: int,
        loop: asyncio.AbstractEventLoop | None,
        conn_lost_cb: Any = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        local_loop = loop if loop is not None else asyncio.get_running_loop()
        self.protocol = _Protocol(local_loop, conn_lost_cb, self._news)
        self._client_task = local_loop.create_task(
            local_loop.create_connection(lambda: self.protocol, host, port, ssl=ssl_context)
        )


# -- one connection with one folder selected ----------------------------------------------------


class _Session:
    def __init__(self, intake: ImapIntake, folder: str) -> None:
        self.intake = intake
        self.cfg = intake.cfg
        self.folder = folder
        self.news = asyncio.Event()  # EXISTS/RECENT seen since the last round began
        self.lost = asyncio.Event()
        self.client: _Client | None = None
        self.uidvalidity = 0

    # -- commands ---------------------------------------------------------------------------

    async def cmd(self, what: str, aw: Awaitable[T], limit_s: float | None = -1.0) -> T:
        """Run one command, failing fast when the connection drops; `limit_s` -1 = cfg.timeout."""
        limit = self.cfg.timeout if limit_s == -1.0 else limit_s
        task = asyncio.ensure_future(aw)
        lost = asyncio.ensure_future(self.lost.wait())
        try:
            done, _ = await asyncio.wait(
                {task, lost}, timeout=limit, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            lost.cancel()
        if task in done:
            try:
                return task.result()
            except (TimeoutError, aioimaplib.AioImapException) as exc:
                raise ImapError(f"{what}: {type(exc).__name__} {exc}".strip()) from exc
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if self.lost.is_set():
            raise ImapError(f"connection lost during {what}")
        raise ImapError(f"{what}: no answer within {limit:g}s")

    def _check(self, what: str, resp: Any) -> Any:
        if getattr(resp, "result", None) != "OK":
            raise ImapError(f"{what} failed: {_response_text(resp)}")
        return resp

    # -- connecting -------------------------------------------------------------------------

    def _ssl_context(self) -> ssl.SSLContext:
        cafile: str | None = None
        if self.cfg.ca_file:
            path = Path(self.cfg.ca_file)
            if not path.is_absolute():
                path = self.intake.base_dir / path
            cafile = str(path)
        try:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
        except (OSError, ssl.SSLError) as exc:
            raise ImapTlsError(f"cannot load ca_file {cafile}: {exc}") from exc
        if not self.cfg.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def _tls_error(self, exc: ssl.SSLCertVerificationError) -> ImapTlsError:
        hint = "" if self.cfg.ca_file else " (a private CA? set ca_file)"
        return ImapTlsError(
            f"TLS certificate verification failed for {self.cfg.host}:{self.cfg.server_port()}: "
            f"{exc.verify_message or exc.reason}{hint}"
        )

    async def open(self) -> None:
        cfg = self.cfg
        port = cfg.server_port()
        ctx = self._ssl_context() if cfg.security != "plain" else None
        self.client = _Client(
            cfg.host,
            port,
            timeout=cfg.timeout,
            ssl_context=ctx if cfg.security == "tls" else None,
            news=self.news,
            lost=self.lost,
        )
        try:
            await self.cmd("connect", self.client.wait_hello_from_server())
        except ImapError as exc:
            cause = exc.__cause__
            if isinstance(cause, ssl.SSLCertVerificationError):
                raise self._tls_error(cause) from cause
            raise
        except ssl.SSLCertVerificationError as exc:
            raise self._tls_error(exc) from exc
        proto = self.client.protocol
        with contextlib.suppress(OSError, AttributeError):
            sock = proto.transport.get_extra_info("socket")
            if sock is not None:
                # A silently dropped connection (NAT, firewall) is noticed during a long IDLE.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        if cfg.security == "starttls":
            assert ctx is not None
            await self._starttls(ctx)
        await self._authenticate()
        await self.cmd("CAPABILITY", proto.capability())
        if cfg.after == "move":
            await self._ensure_folder(cfg.move_to)
        resp = self._check(
            f"SELECT {self.folder}",
            await self.cmd("SELECT", self.client.select(_mailbox_arg(self.folder))),
        )
        uidvalidity = 0
        for line in resp.lines:
            if isinstance(line, bytes | bytearray):
                m = _UIDVALIDITY_RE.search(bytes(line))
                if m:
                    uidvalidity = int(m[1])
        if not uidvalidity:
            log.warning(
                "imap_no_uidvalidity",
                extra={"fields": {"mailbox": cfg.name, "folder": self.folder}},
            )
        self.uidvalidity = uidvalidity

    async def _starttls(self, ctx: ssl.SSLContext) -> None:
        assert self.client is not None
        proto = self.client.protocol
        if "STARTTLS" not in proto.capabilities:
            raise ImapTlsError(f"{self.cfg.host} does not offer STARTTLS")
        self._check(
            "STARTTLS",
            await self.cmd(
                "STARTTLS",
                proto.execute(aioimaplib.Command("STARTTLS", proto.new_tag(), loop=proto.loop)),
            ),
        )
        loop = asyncio.get_running_loop()
        try:
            transport = await self.cmd(
                "TLS handshake",
                loop.start_tls(proto.transport, proto, ctx, server_hostname=self.cfg.host),
            )
        except ImapError as exc:
            if isinstance(exc.__cause__, ssl.SSLCertVerificationError):
                raise self._tls_error(exc.__cause__) from exc.__cause__
            raise
        except ssl.SSLCertVerificationError as exc:
            raise self._tls_error(exc) from exc
        proto.transport = transport
        # RFC 3501 6.2.1: capabilities learnt before STARTTLS must be discarded.
        await self.cmd("CAPABILITY", proto.capability())

    async def _authenticate(self) -> None:
        assert self.client is not None
        cfg = self.cfg
        proto = self.client.protocol
        if cfg.auth == "xoauth2":
            token = await self.intake._oauth2_token()
            resp = await self.cmd("AUTHENTICATE XOAUTH2", proto.xoauth2(cfg.username, token))
        else:
            try:
                secret = resolve_secret(
                    cfg.password,
                    cfg.password_file,
                    cfg.password_env,
                    what=f"imap {cfg.name} password",
                    base_dir=self.intake.base_dir,
                )
            except SecretError as exc:
                raise ImapLoginError(str(exc)) from exc
            assert secret is not None
            if "LOGINDISABLED" in proto.capabilities:
                raise ImapLoginError("the server refuses LOGIN on this connection (LOGINDISABLED)")
            resp = await self.cmd(
                "LOGIN",
                proto.login(aioimaplib.quoted(cfg.username), secret.get_secret_value()),
            )
        if resp.result != "OK":
            raise ImapLoginError(_response_text(resp) or "refused")

    async def _ensure_folder(self, name: str) -> None:
        assert self.client is not None
        arg = _mailbox_arg(name)
        resp = self._check("LIST", await self.cmd("LIST", self.client.list('""', arg)))
        if any(isinstance(x, bytes) and x.upper().startswith(b"(") for x in resp.lines[:-1]):
            return
        created = await self.cmd("CREATE", self.client.create(arg))
        if created.result != "OK" and b"ALREADYEXISTS" not in b" ".join(
            bytes(x) for x in created.lines if isinstance(x, bytes | bytearray)
        ):
            raise ImapError(f"CREATE {name} failed: {_response_text(created)}")
        with contextlib.suppress(ImapError):
            await self.cmd("SUBSCRIBE", self.client.subscribe(arg))
        log.info(
            "imap_folder_created", extra={"fields": {"mailbox": self.cfg.name, "folder": name}}
        )

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        proto = client.protocol
        if not self.lost.is_set() and proto.transport is not None:
            with contextlib.suppress(Exception):
                if client.has_pending_idle():
                    client.idle_done()
                await asyncio.wait_for(client.logout(), 2.0)
        if proto.transport is not None:
            proto.transport.close()
        for task in list(client.tasks) + list(proto.tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            client._client_task.cancel()

    # -- mail -------------------------------------------------------------------------------

    async def search(self) -> list[int]:
        assert self.client is not None
        criteria = ("UNSEEN", "UNDELETED") if self.cfg.after == "seen" else ("UNDELETED",)
        resp = self._check(
            "UID SEARCH",
            await self.cmd("UID SEARCH", self.client.uid_search(*criteria, charset=None)),
        )
        if self.client.protocol.last_uidvalidity not in (0, self.uidvalidity):
            # Servers usually drop the session instead; either way the UIDs changed meaning.
            raise ImapError("UIDVALIDITY changed while the folder was selected")
        uids: set[int] = set()
        for line in resp.lines[:-1]:
            if isinstance(line, bytes):
                uids.update(int(tok) for tok in line.split() if tok.isdigit())
        return sorted(uids)

    async def sizes(self, uids: Sequence[int]) -> dict[int, int]:
        assert self.client is not None
        resp = self._check(
            "UID FETCH RFC822.SIZE",
            await self.cmd(
                "UID FETCH", self.client.uid("fetch", uid_set(uids), "(UID RFC822.SIZE)")
            ),
        )
        out: dict[int, int] = {}
        for text, _ in parse_fetch(resp.lines):
            u, s = _UID_RE.search(text), _SIZE_RE.search(text)
            if u and s:
                out[int(u[1])] = int(s[1])
        return out

    async def bodies(self, uids: Sequence[int]) -> dict[int, bytes]:
        assert self.client is not None
        # No overall limit: aioimaplib's own timer restarts with every chunk of data received.
        resp = self._check(
            "UID FETCH BODY.PEEK[]",
            await self.cmd(
                "UID FETCH",
                self.client.uid("fetch", uid_set(uids), "(UID BODY.PEEK[])"),
                limit_s=None,
            ),
        )
        out: dict[int, bytes] = {}
        for text, literal in parse_fetch(resp.lines):
            u = _UID_RE.search(text)
            if u and literal is not None:
                out[int(u[1])] = literal
        return out

    async def after(self, uids: Sequence[int]) -> None:
        """The configured after-action, for mail that is durable in the spool."""
        assert self.client is not None
        client, cfg, uset = self.client, self.cfg, uid_set(uids)
        caps = client.protocol.capabilities
        if cfg.after == "seen":
            self._check(
                "UID STORE \\Seen",
                await self.cmd("UID STORE", client.uid("store", uset, "+FLAGS.SILENT", r"(\Seen)")),
            )
            return
        if cfg.after == "move":
            target = _mailbox_arg(cfg.move_to)
            if "MOVE" in caps:
                self._check(
                    "UID MOVE", await self.cmd("UID MOVE", client.uid("move", uset, target))
                )
                return
            self._check("UID COPY", await self.cmd("UID COPY", client.uid("copy", uset, target)))
        self._check(
            "UID STORE \\Deleted",
            await self.cmd("UID STORE", client.uid("store", uset, "+FLAGS.SILENT", r"(\Deleted)")),
        )
        if "UIDPLUS" in caps:
            self._check("UID EXPUNGE", await self.cmd("UID EXPUNGE", client.uid("expunge", uset)))
        else:
            # Without UIDPLUS this also expunges mail someone else flagged \Deleted here.
            self._check("EXPUNGE", await self.cmd("EXPUNGE", client.expunge()))

    @property
    def can_idle(self) -> bool:
        return self.client is not None and "IDLE" in self.client.protocol.capabilities

    async def idle(self, stopping: asyncio.Event) -> None:
        """IDLE until EXISTS/RECENT, `idle_timeout`, stop; raises ImapError when the line drops."""
        assert self.client is not None
        client = self.client
        if self.news.is_set():
            return
        # aioimaplib's own IDLE timer is pushed past ours: we end IDLE ourselves.
        idle_task = await self.cmd("IDLE", client.idle_start(timeout=self.cfg.idle_timeout + 3600))
        self.intake.idles += 1
        await _first([self.news, stopping, self.lost], self.cfg.idle_timeout)
        if self.lost.is_set():
            idle_task.cancel()
            raise ImapError("connection lost during IDLE")
        client.idle_done()
        self._check("IDLE", await self.cmd("IDLE DONE", idle_task))
        queue = client.protocol.idle_queue
        while not queue.empty():
            queue.get_nowait()


# -- the intake ---------------------------------------------------------------------------------


class ImapIntake:
    """Fetches one `[[imap]]` mailbox into the spool. See the module docstring.

    `retry_base`, `retry_cap`, `login_retry`, `spool_retry_cap` and `down_after` shape the
    backoff; tests shorten them instead of sleeping.
    """

    def __init__(
        self,
        cfg: ImapConfig,
        spool: Spool,
        status: Component,
        *,
        base_dir: Path,
        retry_base: float = retry.IMAP.base,
        retry_cap: float = retry.IMAP.cap,
        login_retry: float = 60.0,
        spool_retry_cap: float = 60.0,
        down_after: int = 3,
        stop_grace: float = 10.0,
    ) -> None:
        self.cfg = cfg
        self.spool = spool
        self.status = status
        # aioimaplib logs every byte at DEBUG (message bodies, the XOAUTH2 string) and each
        # unsolicited EXISTS/EXPUNGE at INFO: keep it to warnings unless configured explicitly.
        lib_log = logging.getLogger("aioimaplib.aioimaplib")
        if lib_log.level == logging.NOTSET:
            lib_log.setLevel(logging.WARNING)
        self.base_dir = Path(base_dir)
        self.retry_base = retry_base
        self.retry_cap = retry_cap
        self.login_retry = login_retry
        self.spool_retry_cap = spool_retry_cap
        self.down_after = down_after
        self.stop_grace = stop_grace
        self._stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._problems: dict[str, str] = {}  # folder -> why it is down
        self._uidvalidity: dict[str, int] = {}
        self._too_large: set[str] = set()  # source keys already reported
        # Counters (tests, bench, metrics).
        self.stored = 0
        self.actioned = 0
        self.connects = 0
        self.login_failures = 0
        self.idles = 0  # IDLE commands issued (re-issued every idle_timeout)
        if cfg.security != "plain" and not cfg.verify:
            log.warning(
                "imap_tls_unverified",
                extra={
                    "fields": {"mailbox": cfg.name, "host": cfg.host, "note": "verify_is_false"}
                },
            )

    # -- lifecycle --------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch every folder (one connection each) until `stop()`."""
        if self._stopping.is_set():
            return
        self._tasks = [
            asyncio.create_task(self._folder_loop(f), name=f"imap:{self.cfg.name}:{f}")
            for f in self.cfg.folders
        ]
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for t in self._tasks:
                t.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def stop(self) -> None:
        """Finish the chunk in hand (its puts and after-action), log out, return."""
        self._stopping.set()
        pending = [t for t in self._tasks if not t.done()]
        if not pending:
            return
        _, still = await asyncio.wait(pending, timeout=self.stop_grace)
        for t in still:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    # -- status -----------------------------------------------------------------------------

    def _set_problem(self, folder: str, reason: str | None) -> None:
        if reason is None:
            self._problems.pop(folder, None)
        else:
            self._problems[folder] = reason
        if self._problems:
            self.status.set_down(
                "; ".join(f"{self.cfg.name}/{f}: {r}" for f, r in sorted(self._problems.items()))
            )
        else:
            self.status.set_ok(f"{len(self.cfg.folders)} folder(s) watched")

    def _delay(self, failures: int, base: float) -> float:
        """The one retry policy (gateway.retry) with this poller's bounds."""
        return retry.IMAP.replace(base=base, cap=self.retry_cap).delay(failures)

    # -- per folder -------------------------------------------------------------------------

    async def _folder_loop(self, folder: str) -> None:
        name = self.cfg.name
        failures = 0
        while not self._stopping.is_set():
            session = _Session(self, folder)
            slow = False
            try:
                self.connects += 1
                await session.open()
                self._selected(session)
                failures = 0
                self._set_problem(folder, None)
                await self._serve(session)
            except ImapLoginError as exc:
                failures += 1
                slow = True
                self.login_failures += 1
                log.error(
                    "imap_login_failed",
                    extra={
                        "fields": {
                            "mailbox": name,
                            "folder": folder,
                            "user": self.cfg.username,
                            "reason": str(exc),
                        }
                    },
                )
                self._set_problem(folder, f"login failed: {exc}")
            except ImapTlsError as exc:
                failures += 1
                slow = True
                log.error(
                    "imap_tls_failed",
                    extra={"fields": {"mailbox": name, "folder": folder, "reason": str(exc)}},
                )
                self._set_problem(folder, str(exc))
            except (TimeoutError, ImapError, OSError, ssl.SSLError) as exc:
                failures += 1
                reason = str(exc) or type(exc).__name__
                log.warning(
                    "imap_connection_failed",
                    extra={
                        "fields": {
                            "mailbox": name,
                            "folder": folder,
                            "failures": failures,
                            "reason": reason,
                        }
                    },
                )
                if failures >= self.down_after:
                    self._set_problem(folder, f"{failures} connection failures: {reason}")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug must not end the intake: log it and reconnect
                failures += 1
                log.exception(
                    "imap_unexpected_error",
                    extra={"fields": {"mailbox": name, "folder": folder, "error": str(exc)}},
                )
                if failures >= self.down_after:
                    self._set_problem(folder, f"unexpected error: {exc}")
            finally:
                await session.close()
            if self._stopping.is_set():
                break
            delay = self._delay(failures, self.login_retry if slow else self.retry_base)
            log.info(
                "imap_reconnect",
                extra={"fields": {"mailbox": name, "folder": folder, "in_seconds": f"{delay:.1f}"}},
            )
            await _first([self._stopping], delay)
        log.info("imap_stopped", extra={"fields": {"mailbox": name, "folder": folder}})

    def _selected(self, s: _Session) -> None:
        old = self._uidvalidity.get(s.folder)
        if old is not None and old != s.uidvalidity:
            log.warning(
                "imap_uidvalidity_changed",
                extra={
                    "fields": {
                        "mailbox": self.cfg.name,
                        "folder": s.folder,
                        "old": old,
                        "new": s.uidvalidity,
                        "note": "mail_still_in_folder_is_stored_again_and_deduplicated_by_the_worker",
                    }
                },
            )
            prefix = f"imap:{self.cfg.name}:{s.folder}:"
            self._too_large = {k for k in self._too_large if not k.startswith(prefix)}
        self._uidvalidity[s.folder] = s.uidvalidity
        log.info(
            "imap_connected",
            extra={
                "fields": {
                    "mailbox": self.cfg.name,
                    "folder": s.folder,
                    "uidvalidity": s.uidvalidity,
                    "idle": s.can_idle,
                }
            },
        )

    async def _serve(self, s: _Session) -> None:
        spool_failures = 0
        while not self._stopping.is_set():
            s.news.clear()
            try:
                handled = await self._round(s)
            except _SpoolBlocked as exc:
                spool_failures += 1
                delay = min(self.spool_retry_cap, self._delay(spool_failures, self.retry_base))
                log.error(
                    "imap_spool_failed",
                    extra={
                        "fields": {
                            "mailbox": self.cfg.name,
                            "folder": s.folder,
                            "failures": spool_failures,
                            "reason": str(exc),
                            "retry_in_seconds": f"{delay:.1f}",
                            "note": "mail_left_untouched",
                        }
                    },
                )
                self._set_problem(s.folder, f"spool unavailable: {exc}")
                await _first([self._stopping, s.lost], delay)
                if s.lost.is_set():
                    raise ImapError("connection lost") from None
                continue
            if spool_failures:
                spool_failures = 0
                self._set_problem(s.folder, None)
            if self._stopping.is_set():
                return
            if handled or s.news.is_set():
                continue  # something may have arrived while we worked: look again first
            if s.can_idle:
                await s.idle(self._stopping)
            else:
                await _first([self._stopping, s.lost], self.cfg.poll_interval)
                if s.lost.is_set():
                    raise ImapError("connection lost")

    def _key(self, folder: str, uidvalidity: int, uid: int) -> str:
        return f"imap:{self.cfg.name}:{folder}:{uidvalidity}:{uid}"

    async def _round(self, s: _Session) -> int:
        """One search and its chunks; returns how many mails were stored or finished."""
        uids = await s.search()
        handled = 0
        for start in range(0, len(uids), self.cfg.batch):
            if self._stopping.is_set():
                break
            handled += await self._chunk(s, uids[start : start + self.cfg.batch])
        return handled

    async def _chunk(self, s: _Session, chunk: list[int]) -> int:
        keys = {uid: self._key(s.folder, s.uidvalidity, uid) for uid in chunk}
        wanted = [uid for uid in chunk if keys[uid] not in self._too_large]
        try:
            stored_keys = await self.spool.known_source_keys([keys[uid] for uid in wanted])
        except SpoolError as exc:
            raise _SpoolBlocked(exc) from exc
        known = [uid for uid in wanted if keys[uid] in stored_keys]
        fresh = [uid for uid in wanted if keys[uid] not in stored_keys]
        stored: list[int] = []
        blocked: SpoolError | None = None
        if fresh:
            sizes = await s.sizes(fresh)
            plan: list[list[int]] = [[]]
            plan_bytes = 0
            for uid in fresh:
                size = sizes.get(uid)
                if size is None:
                    continue  # expunged meanwhile by someone else
                if size > self.cfg.max_size:
                    self._too_large.add(keys[uid])
                    log.warning(
                        "imap_message_too_large",
                        extra={
                            "fields": {
                                "mailbox": self.cfg.name,
                                "folder": s.folder,
                                "uid": uid,
                                "size": size,
                                "max_size": self.cfg.max_size,
                                "note": "left_in_folder",
                            }
                        },
                    )
                    continue
                if plan[-1] and plan_bytes + size > BATCH_BYTES:
                    plan.append([])
                    plan_bytes = 0
                plan[-1].append(uid)
                plan_bytes += size
            for part in plan:
                if not part:
                    continue
                bodies = await s.bodies(part)
                order = [uid for uid in part if uid in bodies]
                results = await asyncio.gather(
                    *(self._store(s.folder, keys[uid], bodies[uid]) for uid in order),
                    return_exceptions=True,
                )
                for uid, res in zip(order, results, strict=True):
                    if isinstance(res, SpoolError):
                        blocked = res
                    elif isinstance(res, BaseException):
                        raise res
                    else:
                        stored.append(uid)
                if blocked is not None:
                    break
        done = sorted(known + stored)
        if done:
            # Only now, with every put above returned (durable), is the mail moved/flagged.
            await s.after(done)
            self.actioned += len(done)
            log.info(
                "imap_batch",
                extra={
                    "fields": {
                        "mailbox": self.cfg.name,
                        "folder": s.folder,
                        "stored": len(stored),
                        "finished": len(known),
                        "uids": uid_set(done),
                    }
                },
            )
        if blocked is not None:
            raise _SpoolBlocked(blocked)
        return len(done)

    async def _store(self, folder: str, key: str, raw: bytes) -> int:
        mail_from, rcpt_tos = envelope_fields(raw, self.cfg.username)
        envelope = Envelope(
            mail_from=mail_from,
            rcpt_tos=rcpt_tos,
            peer="",
            intake=self.cfg.name,
            received_at=time.time(),
        )
        result = await self.spool.put(raw, envelope, source_key=key)
        if not result.duplicate:
            self.stored += 1
        log.debug(
            "imap_stored",
            extra={
                "fields": {
                    "mailbox": self.cfg.name,
                    "folder": folder,
                    "key": key,
                    "id": result.id,
                    "size": len(raw),
                    "duplicate": result.duplicate,
                }
            },
        )
        return result.id

    # -- XOAUTH2 ----------------------------------------------------------------------------

    async def _oauth2_token(self) -> str:
        """The access token, fresh for this connection (file re-read, or command re-run)."""
        cfg = self.cfg
        if cfg.oauth2_token_file:
            try:
                secret = resolve_secret(
                    None,
                    cfg.oauth2_token_file,
                    None,
                    what=f"imap {cfg.name} oauth2 token",
                    base_dir=self.base_dir,
                )
            except SecretError as exc:
                raise ImapLoginError(str(exc)) from exc
            token = secret.get_secret_value().strip() if secret else ""
            if not token:
                raise ImapLoginError(f"oauth2_token_file {cfg.oauth2_token_file} is empty")
            return token
        command = cfg.oauth2_token_command
        assert command is not None
        argv = shlex.split(command) if isinstance(command, str) else list(command)
        if not argv:
            raise ImapLoginError("oauth2_token_command is empty")
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=self.base_dir,
            )
        except OSError as exc:
            raise ImapLoginError(f"oauth2_token_command {argv[0]}: {exc.strerror}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(), cfg.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise ImapLoginError(
                f"oauth2_token_command {argv[0]} gave no token within {cfg.timeout:g}s"
            ) from None
        if proc.returncode != 0:
            last = (err.decode("utf-8", "replace").strip().splitlines() or [""])[-1][:200]
            raise ImapLoginError(
                f"oauth2_token_command {argv[0]} exited with {proc.returncode}: {last}"
            )
        token = out.decode("utf-8", "replace").strip()
        if not token:
            raise ImapLoginError(f"oauth2_token_command {argv[0]} printed no token")
        return token
