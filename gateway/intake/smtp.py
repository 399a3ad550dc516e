"""SMTP intake (aiosmtpd): RCPT policy, size limit, and `250` only after the spool commit.

The listener never parses and never calls a backend: it stores the raw bytes with the envelope
and answers. Status strings are named constants; what will never succeed is 5xx, what may succeed
later is 4xx. While the daemon drains (SIGTERM), new connections get 421.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import Any

from aiosmtpd.smtp import SMTP, Session
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
ERR_452_DISK_FULL = "452 4.3.1 Insufficient system storage, try again later"
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
            log.info("rcpt_refused", extra={"fields": {"peer": _peer_ip(session)}})
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
            log.error("spool_put_failed", extra={"fields": {"intake": "smtp", "error": str(exc)}})
            return ERR_452_DISK_FULL if exc.disk_full else ERR_451_SPOOL
        if self.on_stored is not None:
            self.on_stored(result.id)
        log.debug(
            "accepted", extra={"fields": {"intake": "smtp", "id": result.id, "size": len(raw)}}
        )
        return OK_QUEUED.format(id=result.id)


def _peer_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


class GatewaySMTP(SMTP):
    """aiosmtpd's SMTP with a drain switch and a per-IP connection limit, through its public
    interface only: the protocol's `connection_made`/`connection_lost` (counting sessions; a
    connection over the limit or during the drain gets 421 and is closed before aiosmtpd sees
    it), `line_length_limit` and `data_size_limit`. Everything else is aiosmtpd's own.

    DATA is read by aiosmtpd: line by line, dot-stuffing undone, the size checked as it goes.
    What that costs and what it cannot do (aiosmtpd 1.4 offers no hook inside DATA):
    - past `data_size_limit` it stops keeping the lines (memory stays bounded) but reads on to
      the end of the data before it answers `552 Error: Too much mail data` (not 5.3.4, and not
      at once). A client that announces SIZE= is refused at MAIL FROM before sending anything;
      one that does not can keep the session busy until it finishes or goes quiet for
      `data_timeout` seconds. Put Postfix in front (the pipe intake) where that matters.
    - it holds a mail as a list of lines and then joins them: about twice the mail's size
      at the end of DATA, for each session in DATA at once.
    Lines longer than RFC 5321's 1000 octets are kept as they are (`line_length_limit` is raised
    to the size limit): refusing them would lose real mail, and the parser copes.
    """

    def __init__(self, handler: IntakeHandler, listener: SmtpListener, **kwargs: Any) -> None:
        # aiosmtpd reads each line within this limit (its StreamReader's); the size limit bounds it
        self.line_length_limit = max(SMTP.line_length_limit, int(kwargs["data_size_limit"]) + 2)
        super().__init__(handler, **kwargs)
        self.listener = listener
        self.counted_ip: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if peer else ""
        lst = self.listener
        if lst.draining or lst.per_ip[ip] >= lst.max_per_ip:
            reply = ERR_421_DRAINING if lst.draining else ERR_421_TOO_MANY
            try:
                transport.write(reply.encode() + b"\r\n")  # type: ignore[attr-defined]
            finally:
                transport.close()
            return
        lst.per_ip[ip] += 1
        lst.sessions += 1
        self.counted_ip = ip
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        if self.counted_ip is not None:
            lst = self.listener
            lst.per_ip[self.counted_ip] -= 1
            if lst.per_ip[self.counted_ip] <= 0:
                del lst.per_ip[self.counted_ip]
            lst.sessions -= 1
            self.counted_ip = None
            super().connection_lost(error)


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
        self._server: asyncio.Server | None = None

    def _factory(self) -> GatewaySMTP:
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
        log.info("smtp_listening", extra={"fields": {"host": self.host, "port": self.port}})

    def drain(self) -> None:
        """From now on new connections get 421; sessions already open may finish."""
        self.draining = True

    async def sessions_done(self, grace: float) -> None:
        """Wait up to `grace` s for the open sessions to end (the listener stays open: with
        `drain` on, new connections get 421)."""
        deadline = time.monotonic() + grace
        while self.sessions > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self, grace: float = 5.0) -> None:
        self.draining = True
        if self._server is not None:
            self._server.close()
            deadline = time.monotonic() + grace
            while self.sessions > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            self._server = None
