"""SMTP intake (aiosmtpd): RCPT policy, size limit, and `250` only after the spool commit.

The listener never parses and never calls a backend: it stores the raw bytes with the envelope
and answers. Status strings are named constants; what will never succeed is 5xx, what may succeed
later is 4xx. While the daemon drains (SIGTERM), new connections get 421.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from typing import Any

import aiosmtpd
from aiosmtpd.smtp import MISSING, SMTP, Session, _AuthMechAttr
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from gateway.errors import SpoolError
from gateway.models import Envelope
from gateway.spool.base import Spool

log = logging.getLogger("gateway.intake.smtp")

OK_QUEUED = "250 2.0.0 Ok: queued as {id}"
OK_RCPT = "250 2.1.5 Ok"
ERR_421_DRAINING = "421 4.3.2 Service shutting down, try again later"
ERR_421_TOO_MANY = "421 4.7.0 Too many connections from your address, try again later"
ERR_451_SPOOL = "451 4.3.0 Temporary local problem storing the message, try again later"
ERR_452_TOO_MANY_RCPT = "452 4.5.3 Too many recipients"
ERR_550_RCPT = "550 5.1.1 <{addr}>: recipient address not accepted here"
ERR_553_SYNTAX = "553 5.1.3 Bad recipient address syntax"
ERR_554_NO_RCPT = "554 5.5.1 No valid recipients"


class IntakeHandler:
    """aiosmtpd handler: see the module docstring."""

    def __init__(
        self,
        spool: Spool,
        recipients: set[str],
        *,
        max_recipients: int = 100,
        on_stored: Any = None,
    ) -> None:
        self.spool = spool
        self.recipients = {r.lower() for r in recipients}
        self.max_recipients = max_recipients
        self.on_stored = on_stored  # callback(msg_id) so the worker wakes at once

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        addr = address.strip().lower()
        if "@" not in addr:
            return ERR_553_SYNTAX
        if addr not in self.recipients:
            log.info("event=rcpt_refused peer=%s", _peer_ip(session))
            return ERR_550_RCPT.format(addr=address)
        if len(envelope.rcpt_tos) >= self.max_recipients:
            return ERR_452_TOO_MANY_RCPT
        envelope.rcpt_tos.append(addr)
        return OK_RCPT

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        if not envelope.rcpt_tos:
            return ERR_554_NO_RCPT
        raw = envelope.original_content or envelope.content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        env = Envelope(
            mail_from=(envelope.mail_from or "").strip("<>"),
            rcpt_tos=tuple(envelope.rcpt_tos),
            peer=_peer_ip(session),
            intake="smtp",
            received_at=time.time(),
        )
        try:
            result = await self.spool.put(raw, env)
        except SpoolError as exc:
            log.error("event=spool_put_failed intake=smtp error=%r", str(exc))
            return ERR_451_SPOOL
        if self.on_stored is not None:
            self.on_stored(result.id)
        log.debug("event=accepted intake=smtp id=%d size=%d", result.id, len(raw))
        return OK_QUEUED.format(id=result.id)


def _peer_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


# aiosmtpd versions whose constructor `_clone` mirrors (tests/test_smtp_intake.py compares a clone
# with a constructed instance); with any other version every connection is constructed normally
_CLONE_VERSIONS = frozenset({"1.4.6"})

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_SIMPLE_PATH = re.compile(
    rf"\s*<(?:({_ATEXT}(?:\.{_ATEXT})*)@({_LABEL}(?:\.{_LABEL})*))?>\s*(.*)",
    re.S,
)
_DATA_END = b"\r\n.\r\n"
_READ_CHUNK = 1 << 16


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with a drain switch, a per-IP connection limit, and three hot paths made
    cheap (the listener takes one connection per mail, so they are most of its CPU):

    - construction: aiosmtpd's constructor looks its own methods up with `inspect.getmembers`
      on every connection; `_clone` copies a template built once (only for aiosmtpd versions
      known to match, see `_CLONE_VERSIONS`);
    - `MAIL FROM`/`RCPT TO` paths of the plain `<local@domain>` form are read with one regular
      expression; anything else goes to aiosmtpd's full RFC 5322 parser;
    - `DATA` is read in blocks into one buffer instead of line by line into a list of lines
      (which also held the message about three times over in memory). Lines longer than 1000
      octets are kept as they are: refusing the mail would lose it, and the parser copes.
    """

    def __init__(self, handler: IntakeHandler, listener: SmtpListener, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._listener = listener
        self._counted_ip: str | None = None

    @classmethod
    def _clone(cls, template: GatewaySMTP) -> GatewaySMTP:
        obj = cls.__new__(cls)
        obj.__dict__.update(template.__dict__)  # settings and the handler's hooks, shared
        # what must be this connection's own: the stream state and methods bound to it
        asyncio.StreamReaderProtocol.__init__(
            obj,
            asyncio.StreamReader(loop=obj.loop, limit=obj.line_length_limit),
            client_connected_cb=obj._cb_client_connected,
            loop=obj.loop,
        )
        obj._smtp_methods = {name: getattr(obj, "smtp_" + name) for name in template._smtp_methods}
        obj._auth_methods = {
            name: _AuthMechAttr(getattr(obj, attr.method.__name__), True)
            if attr.is_builtin
            else attr
            for name, attr in template._auth_methods.items()
        }
        obj._counted_ip = None
        obj.command_size_limits.clear()  # as aiosmtpd's constructor does (EHLO adds to it)
        return obj

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else ""
        lst = self._listener
        if lst.draining or lst.per_ip[ip] >= lst.max_per_ip:
            reply = ERR_421_DRAINING if lst.draining else ERR_421_TOO_MANY
            try:
                transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
            finally:
                transport.close()
            return
        lst.per_ip[ip] += 1
        lst.sessions += 1
        self._counted_ip = ip
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self._counted_ip is not None:
            lst = self._listener
            lst.per_ip[self._counted_ip] -= 1
            if lst.per_ip[self._counted_ip] <= 0:
                del lst.per_ip[self._counted_ip]
            lst.sessions -= 1
            self._counted_ip = None
            super().connection_lost(error)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        m = _SIMPLE_PATH.fullmatch(arg) if arg else None
        if m is None:
            return super()._getaddr(arg)
        local, domain, rest = m.groups()
        if local is None:
            return "<>", rest  # the null path, as aiosmtpd gives it
        if self.local_part_limit and len(local) > self.local_part_limit:
            return None, None
        return f"{local}@{domain}", rest

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await self._read_data()
        if content is None:  # more than the size limit: read to the end, then refuse
            await self.push("552 Error: Too much mail data")
            self._set_post_data_state()
            return
        self.envelope.content = content  # type: ignore[assignment]
        self.envelope.original_content = content  # type: ignore[assignment]
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    async def _read_data(self) -> bytearray | None:
        """The mail up to the lone dot, dot-stuffing undone; None if it exceeded the size limit.

        `buf` starts with a CRLF of our own, so that the end marker and a dot-stuffed first line
        look like every other line's. Bytes after the end marker (a client that pipelines without
        PIPELINING) go back to the reader for the next command.
        """
        reader = self._reader
        limit = self.data_size_limit or 0
        buf = bytearray(b"\r\n")
        scan = 0
        too_much = False
        while True:
            try:
                chunk = await reader.read(_READ_CHUNK)
            except asyncio.CancelledError:
                log.info("event=smtp_data_cut peer=%s", self.session and _peer_ip(self.session))
                self._writer.close()
                raise
            if not chunk:  # connection closed in the middle of DATA
                raise ConnectionResetError("connection closed during DATA")
            buf += chunk
            end = buf.find(_DATA_END, scan)
            if end >= 0:
                break
            scan = max(0, len(buf) - len(_DATA_END) + 1)
            if limit and len(buf) - 2 > limit:
                too_much = True
                buf = buf[scan:]  # keep only what the end marker could start in
                scan = 0
        rest = buf[end + len(_DATA_END) :]
        if rest:
            reader._buffer[0:0] = rest  # type: ignore[attr-defined]
        if too_much or (limit and end > limit):
            return None
        del buf[end + 2 :]  # keep the CRLF that ends the last line
        if buf.find(b"\r\n.") >= 0:
            buf = buf.replace(b"\r\n.", b"\r\n")
        del buf[:2]
        return buf


class SmtpListener:
    """The SMTP intake server on the daemon's event loop."""

    def __init__(
        self,
        handler: IntakeHandler,
        host: str,
        port: int,
        *,
        hostname: str,
        max_size: int,
        max_per_ip: int = 64,
        data_timeout: float = 300.0,
    ) -> None:
        self.handler = handler
        self.host, self.port = host, port
        self.hostname = hostname
        self.max_size = max_size
        self.max_per_ip = max_per_ip
        self.data_timeout = data_timeout
        self.draining = False
        self.per_ip: Counter[str] = Counter()
        self.sessions = 0
        self._server: asyncio.base_events.Server | None = None
        self._template: GatewaySMTP | None = None

    def _factory(self) -> GatewaySMTP:
        template = self._template
        if template is not None:
            return GatewaySMTP._clone(template)
        proto = self._construct()
        if aiosmtpd.__version__ in _CLONE_VERSIONS:
            self._template = self._construct()  # never connected: the pattern for the next ones
        return proto

    def _construct(self) -> GatewaySMTP:
        return GatewaySMTP(
            self.handler,
            self,
            hostname=self.hostname,
            ident="ticket-gateway ESMTP",
            data_size_limit=self.max_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            timeout=self.data_timeout,
        )

    async def start(self, sock: Any = None) -> None:
        loop = asyncio.get_running_loop()
        if sock is not None:  # socket activation
            self._server = await loop.create_server(self._factory, sock=sock, backlog=1024)
        else:
            self._server = await loop.create_server(
                self._factory, self.host, self.port, backlog=1024, reuse_address=True
            )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("event=smtp_listening host=%s port=%d", self.host, self.port)

    def drain(self) -> None:
        """From now on new connections get 421; sessions already open may finish."""
        self.draining = True

    async def stop(self, grace: float = 5.0) -> None:
        self.draining = True
        if self._server is not None:
            self._server.close()
            deadline = time.monotonic() + grace
            while self.sessions > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self._server = None
