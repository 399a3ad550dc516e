"""Acknowledgements: render a template into a reply, and the outbox sender that delivers it.

The worker renders the reply and records it in the spool's outbox in the same transaction as the
ticket, so an acknowledgement exists only for a ticket that exists, and is never lost while the
relay is down. The sender delivers it through the configured relay with the null envelope sender
by default (a bounce of an acknowledgement can never start a loop) and RFC 3834 headers.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import re
import time
import uuid
from email.header import Header
from email.utils import formataddr, formatdate
from importlib import resources
from pathlib import Path
from typing import Any

import aiosmtplib

from gateway.ackpolicy import safe_subject
from gateway.models import ParsedMail

log = logging.getLogger("gateway.ack")

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
# What a template may quote. `{subject}` is the sender's subject made safe (one line, cut to 60
# characters, links defanged): an acknowledgement goes to an address a stranger may have
# forged, so the default template quotes nothing else a stranger chose besides the ticket
# reference. The others are an admin's opt-in per template (README: "Acknowledgement
# templates"): `{subject_full}` (the whole subject as written), `{sender}` (the address),
# `{sender_name}` (the display name: the field spammers put their message in), `{date}`.
PLACEHOLDERS = frozenset(
    {
        "ref",
        "token",
        "subject",
        "subject_full",
        "sender",
        "sender_name",
        "recipient",
        "backend",
        "date",
    }
)


class Template:
    """A template file: a `Subject:` line, a blank line, then the body; `{placeholders}`."""

    def __init__(self, name: str, text: str) -> None:
        self.name = name
        head, sep, body = text.partition("\n\n")
        subject = "{token} Re: {subject}"
        if sep and head.lower().startswith("subject:"):
            subject = head.split(":", 1)[1].strip()
        else:
            body = text
        self.subject = subject
        self.body = body
        unknown = set(_PLACEHOLDER.findall(subject + body)) - PLACEHOLDERS
        if unknown:
            raise ValueError(
                f"template {name!r}: unknown placeholder(s) {', '.join(sorted(unknown))};"
                f" known: {', '.join(sorted(PLACEHOLDERS))}"
            )

    def render(self, values: dict[str, str]) -> tuple[str, str]:
        def sub(text: str) -> str:
            return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), ""), text)

        return sub(self.subject), sub(self.body)


def load_templates(directory: Path) -> dict[str, Template]:
    """Templates `*.txt` from `directory`; the packaged `default` when the directory lacks one."""
    out: dict[str, Template] = {}
    packaged = resources.files("gateway").joinpath("templates/default.txt")
    out["default"] = Template("default", packaged.read_text(encoding="utf-8"))
    if directory.is_dir():
        for path in sorted(directory.glob("*.txt")):
            out[path.stem] = Template(path.stem, path.read_text(encoding="utf-8"))
    return out


def build_ack(
    template: Template,
    mail: ParsedMail,
    *,
    rcpt: str,
    ref: str,
    token: str,
    from_address: str,
    from_name: str,
    hostname: str,
    backend: str,
) -> tuple[bytes, str]:
    """Render the acknowledgement; return (bytes, its Message-ID without brackets)."""
    values = {
        "ref": ref,
        "token": token,
        "subject": safe_subject(mail.subject),
        "subject_full": mail.subject or "(no subject)",
        "sender": mail.from_addr,
        "sender_name": mail.from_name or mail.from_addr,
        "recipient": from_address,
        "backend": backend,
        "date": mail.date,
    }
    subject, body = template.render(values)
    if token not in subject:  # the token is how replies find their ticket: never lose it
        subject = f"{token} {subject}"
    # written out directly: the email package's generator cost most of an acknowledgement's CPU
    msg_id = f"ack.{uuid.uuid4().hex}@{hostname}"
    lines = ['Content-Type: text/plain; charset="utf-8"', "MIME-Version: 1.0"]
    text = body.replace("\r\n", "\n").replace("\r", "\n")
    if text.isascii() and all(len(line) <= 998 for line in text.split("\n")):
        lines.append("Content-Transfer-Encoding: 7bit")
        payload = text.replace("\n", "\r\n").encode("ascii")
    else:
        lines.append("Content-Transfer-Encoding: base64")
        payload = base64.encodebytes(text.encode("utf-8")).replace(b"\n", b"\r\n")
    sender = formataddr((from_name, from_address)) if from_name else from_address
    lines.append(_fold("From", _one_line(sender)))
    lines.append(_fold("To", _one_line(rcpt)))
    lines.append(_fold("Subject", _header(" ".join(subject.split()))))
    lines.append("Date: " + formatdate(localtime=False, usegmt=True))
    lines.append(f"Message-ID: <{msg_id}>")
    if mail.message_id:
        lines.append(_fold("In-Reply-To", f"<{_one_line(mail.message_id)}>"))
        refs = [*mail.references[-10:], mail.message_id]
        lines.append(_fold("References", " ".join(f"<{_one_line(r)}>" for r in refs)))
    lines.append("Auto-Submitted: auto-replied")
    lines.append("X-Auto-Response-Suppress: All")
    lines.append("Precedence: auto_reply")
    head = "\r\n".join(lines).encode("utf-8") + b"\r\n\r\n"
    return head + payload, msg_id


def _one_line(value: str) -> str:
    """No line breaks inside a header value (a crafted Message-ID must not add headers)."""
    return "".join(value.split("\r")).replace("\n", "").replace("\0", "")


def _fold(name: str, value: str, width: int = 78) -> str:
    """`Name: value`, folded at spaces so that lines stay within `width` where a space allows."""
    if value.find("\n") >= 0:  # already folded (an encoded word sequence)
        return f"{name}: {value}"
    line = f"{name}:"
    out: list[str] = []
    for word in value.split(" "):
        if len(line) + 1 + len(word) > width and line.strip() and not line.endswith(":"):
            out.append(line)
            line = ""
        line += " " + word
    out.append(line)
    return "\r\n".join(out)


def _header(text: str, name: str = "Subject") -> str:
    """RFC 2047-encode a header value when it is not plain ASCII."""
    if text.isascii():
        return text
    return Header(text, "utf-8", header_name=name).encode(linesep="\r\n")


RELAY_IDLE = 10.0  # seconds a relay connection may stay open without a message
RELAY_REUSE = 100  # messages per relay connection, then a new one (as MTAs limit it)


class _RelayConnection:
    """One connection to the relay, kept open for the next message (no connect, EHLO and QUIT
    per acknowledgement); replaced after an error, a reload, RELAY_REUSE messages or RELAY_IDLE."""

    def __init__(self) -> None:
        self.client: aiosmtplib.SMTP | None = None
        self.key: tuple[Any, ...] = ()
        self.count = 0
        self.last_used = 0.0
        self._closing: set[asyncio.Task[None]] = set()

    async def ready(self, key: tuple[Any, ...], make: Any) -> bool:
        """Connect unless open to the same relay; True if an open connection is reused."""
        client = self.client
        if client is not None and (
            key != self.key or not client.is_connected or self.count >= RELAY_REUSE
        ):
            await self.close()
            client = None
        if client is not None:
            return True
        client = make()
        self.client, self.key, self.count = client, key, 0
        try:
            await client.connect()
        except BaseException:
            self.client = None
            raise
        return False

    async def send(self, mail_from: str, rcpts: list[str], data: bytes) -> None:
        assert self.client is not None
        self.last_used = time.monotonic()
        await self.client.sendmail(mail_from, rcpts, data)
        self.count += 1
        self.last_used = time.monotonic()

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is None:
            return
        try:
            if client.is_connected:
                await asyncio.wait_for(client.quit(), 5.0)
        except Exception:  # QUIT is a courtesy; the socket goes either way
            client.close()

    def close_soon(self) -> None:
        task = asyncio.ensure_future(self.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


class AckSender:
    """Delivers the outbox through the relay, with retries; one task, woken by the worker."""

    def __init__(
        self,
        spool: Any,
        relay_host: str,
        relay_port: int,
        *,
        status: Any = None,
        metrics: Any = None,
        relay_tls: str = "none",
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        max_attempts: int = 50,
        parallel: int = 8,
        clock: Any = time.time,
    ) -> None:
        self.spool = spool
        self.host, self.port = relay_host, relay_port
        self.status = status
        self.metrics = metrics  # `Metrics` or the worker process's `EventMetrics`
        self.relay_tls = relay_tls
        self.username, self.password = username, password
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.parallel = parallel  # connections to the relay at once
        self.wake = asyncio.Event()
        self.sent = 0
        self.failed = 0
        self._stopping = False
        self._lanes = [_RelayConnection() for _ in range(max(1, parallel))]

    async def run(self) -> None:
        try:
            while not self._stopping:
                self.wake.clear()  # before reading: a wake-up during the read is not lost
                try:
                    due = await self.spool.due_acks()
                except Exception as exc:
                    log.error("event=outbox_read_failed error=%r", str(exc))
                    due = []
                if due and not self._stopping:
                    # several connections at once: one slow relay round trip must not hold up
                    # the rest; each connection carries one message after another
                    todo = list(reversed(due))
                    lanes = self._lanes[: max(1, min(self.parallel, len(due)))]
                    await asyncio.gather(*(self._drain(lane, todo) for lane in lanes))
                if not due or len(due) < 50:
                    self._close_idle(time.monotonic() - RELAY_IDLE)
                    try:
                        await asyncio.wait_for(self.wake.wait(), timeout=2.0)
                    except TimeoutError:
                        pass
        finally:
            for lane in self._lanes:
                await lane.close()

    async def _drain(self, lane: _RelayConnection, todo: list[Any]) -> None:
        while todo and not self._stopping:
            await self._send_one(todo.pop(), lane)

    def _close_idle(self, before: float) -> None:
        for lane in self._lanes:
            if lane.client is not None and lane.last_used < before:
                lane.close_soon()

    def _relay_key(self) -> tuple[Any, ...]:
        return (self.host, self.port, self.relay_tls, self.username, self.password)

    def _client(self) -> aiosmtplib.SMTP:
        return aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
            use_tls=self.relay_tls == "tls",
            start_tls=self.relay_tls == "starttls",
            username=self.username,
            password=self.password,
        )

    async def _send_one(self, ack: Any, lane: _RelayConnection | None = None) -> None:
        lane = lane or _RelayConnection()
        try:
            for attempt in (1, 2):
                reused = await lane.ready(self._relay_key(), self._client)
                try:
                    # sendmail, not send: "" must go out as the null sender MAIL FROM:<>
                    await lane.send(ack.mail_from, [ack.rcpt], ack.data)
                    break
                except (aiosmtplib.SMTPServerDisconnected, ConnectionError):
                    await lane.close()
                    # a connection the relay closed while it waited: once more on a new one
                    if not reused or attempt == 2:
                        raise
        except aiosmtplib.SMTPRecipientsRefused as exc:
            await lane.close()
            codes = [e.code for e in exc.recipients]
            permanent = all(500 <= c < 600 for c in codes)
            await self._failed(ack, f"relay refused the recipient: {codes}", permanent)
            return
        except aiosmtplib.SMTPResponseException as exc:
            await lane.close()
            permanent = 500 <= exc.code < 600
            await self._failed(ack, f"relay said {exc.code} {exc.message}", permanent)
            return
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            await lane.close()
            await self._failed(ack, f"relay unreachable: {exc}", False)
            return
        except Exception as exc:  # never let one acknowledgement stop the sender
            await lane.close()
            log.exception("event=ack_error ack=%d", ack.id)
            await self._failed(ack, f"internal error: {type(exc).__name__}: {exc}", False)
            return
        await self.spool.ack_result(ack.id, sent=True)
        self.sent += 1
        if self.metrics is not None:
            self.metrics.count("acks_sent")
        if self.status is not None:
            self.status.set_ok()
        log.info("event=ack_sent ack=%d message=%d", ack.id, ack.message_id)

    async def _failed(self, ack: Any, error: str, permanent: bool) -> None:
        if permanent or ack.attempts + 1 >= self.max_attempts:
            self.failed += 1
            await self.spool.ack_result(ack.id, sent=False, error=error)
            log.warning(
                "event=ack_failed ack=%d message=%d error=%r", ack.id, ack.message_id, error
            )
            return
        delay = min(600.0, 2.0 ** min(ack.attempts, 10)) * random.uniform(0.8, 1.2)
        await self.spool.ack_result(ack.id, sent=False, error=error, retry_in=delay)
        if self.status is not None:
            self.status.set_down(error)
        log.info("event=ack_deferred ack=%d retry_in=%.1f error=%r", ack.id, delay, error)

    def stop(self) -> None:
        self._stopping = True
        self.wake.set()
