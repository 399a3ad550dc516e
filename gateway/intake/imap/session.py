"""One IMAP connection with one folder selected (`_Session`): connect (implicit TLS, STARTTLS or
plain to loopback), log in (LOGIN or XOAUTH2), create `move_to`, SELECT; then SEARCH, FETCH, the
after-action and IDLE, each command failing fast when the connection drops. Also the protocol
hooks aioimaplib lacks (EXISTS/RECENT outside IDLE, a SASL error challenge)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aioimaplib

from gateway.intake.imap.errors import ImapError, ImapLoginError, ImapTlsError
from gateway.intake.imap.wire import (
    _NEWS_RE,
    _SIZE_RE,
    _UID_RE,
    _UIDVALIDITY_RE,
    _mailbox_arg,
    _response_text,
    parse_fetch,
    uid_set,
)
from gateway.secrets import SecretError, resolve_secret

if TYPE_CHECKING:
    from gateway.intake.imap.intake import ImapIntake

log = logging.getLogger("gateway.intake.imap")

T = TypeVar("T")


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
