"""The SMTP sink of `gateway simulate`: stores acknowledgements for `GET /_sim/outbox`.

With `POST /_sim/autoreply` it answers every mail with an out-of-office reply sent to the given
SMTP server (the gateway), marked per mode: `rfc3834` (Auto-Submitted: auto-replied),
`precedence` (only Precedence: bulk), `bare` (no marker at all): the loop drill of DESIGN.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import logging
import uuid
from email.message import EmailMessage
from email.utils import formatdate, parseaddr
from typing import Any

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session

from gateway.simulators.state import SimState

log = logging.getLogger("gateway.simulators.sink")


class _Handler:
    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        # parsed when /_sim/outbox is read, not here: the sink shares the machine with the
        # gateway in the benchmarks, and parsing every acknowledgement cost more than receiving
        self.sink.state.outbox.append(
            StoredMail(envelope.mail_from or "", list(envelope.rcpt_tos), raw)
        )
        mode = self.sink.state.autoreply.get("mode", "off")
        if mode != "off":
            msg = email.message_from_bytes(raw, policy=email.policy.default)
            task = asyncio.create_task(self.sink.autoreply(msg, envelope, mode))
            self.sink.tasks.add(task)
            task.add_done_callback(self.sink.tasks.discard)
        return "250 2.0.0 Ok: stored"


class StoredMail:
    """A mail the sink received; its `/_sim/outbox` record is made on first read."""

    __slots__ = ("_record", "mail_from", "raw", "rcpt_tos")

    def __init__(self, mail_from: str, rcpt_tos: list[str], raw: bytes) -> None:
        self.mail_from, self.rcpt_tos, self.raw = mail_from, rcpt_tos, raw
        self._record: dict[str, Any] | None = None

    def record(self) -> dict[str, Any]:
        if self._record is None:
            msg = email.message_from_bytes(self.raw, policy=email.policy.default)
            body = ""
            try:
                part = msg.get_body(preferencelist=("plain", "html"))
                if part is not None:
                    body = part.get_content()
            except (LookupError, KeyError, ValueError):
                body = self.raw.decode("utf-8", "replace")
            self._record = {
                "mail_from": self.mail_from,
                "rcpt_tos": self.rcpt_tos,
                "subject": str(msg.get("Subject", "")),
                "headers": {k: str(v) for k, v in msg.items()},
                "body": body,
            }
        return self._record


class SmtpSink:
    def __init__(self, state: SimState, host: str, port: int) -> None:
        self.state, self.host, self.port = state, host, port
        self._server: asyncio.base_events.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        handler = _Handler(self)
        self._server = await loop.create_server(
            lambda: SMTP(handler, hostname="sim-sink", decode_data=False, enable_SMTPUTF8=True),
            self.host,
            self.port,
            reuse_address=True,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    async def autoreply(self, original: Any, envelope: Envelope, mode: str) -> None:
        target = str(self.state.autoreply.get("smtp") or "127.0.0.1:2525")
        host, _, port = target.rpartition(":")
        to_addr = parseaddr(str(original.get("From", "")))[1] or (envelope.mail_from or "")
        for rcpt in envelope.rcpt_tos:
            reply = EmailMessage()
            reply["From"] = rcpt
            reply["To"] = to_addr
            reply["Subject"] = f"Out of office: {original.get('Subject', '')}"
            reply["Date"] = formatdate(usegmt=True)
            reply["Message-ID"] = f"<ooo.{uuid.uuid4().hex}@sim-sink>"
            if original.get("Message-ID"):
                reply["In-Reply-To"] = str(original["Message-ID"])
            if mode == "rfc3834":
                reply["Auto-Submitted"] = "auto-replied"
            elif mode == "precedence":
                reply["Precedence"] = "bulk"
            reply.set_content("I am out of the office until next week.")
            # RFC 3834 replies go out with a null sender; a "bare" responder behaves like a
            # careless human-looking script and uses its own address.
            sender = "" if mode == "rfc3834" else rcpt
            try:
                await aiosmtplib.send(
                    reply,
                    sender=sender,
                    recipients=[to_addr or "postmaster@localhost"],
                    hostname=host or "127.0.0.1",
                    port=int(port),
                    timeout=10,
                )
            except (aiosmtplib.SMTPException, OSError) as exc:
                log.info(
                    "autoreply_refused", extra={"fields": {"target": target, "error": str(exc)}}
                )
