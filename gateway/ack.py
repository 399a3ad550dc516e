"""Acknowledgements: render a template into a reply, and the outbox sender that delivers it.

The worker renders the reply and records it in the spool's outbox in the same transaction as the
ticket, so an acknowledgement exists only for a ticket that exists, and is never lost while the
relay is down. The sender delivers it through the configured relay with the null envelope sender
by default (a bounce of an acknowledgement can never start a loop) and RFC 3834 headers.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import re
import time
import uuid
from email import policy
from email.headerregistry import Address, BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.utils import formatdate
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway import retry
from gateway.ackpolicy import safe_subject
from gateway.models import ParsedMail
from gateway.spool.base import AckRow, Spool

if TYPE_CHECKING:  # loaded where acknowledgements are sent (the worker), not by the intake
    import aiosmtplib

log = logging.getLogger("gateway.ack")

_PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")


class FoldedOnce(BaseHeader):
    """The last base of every acknowledgement header class (`HeaderRegistry(base_class=...)`):
    a header object folds itself once per policy. The shared ones (`HeaderClasses`) go into
    every acknowledgement, and folding was a third of writing one out."""

    folds: dict[Any, str]

    def fold(self, *, policy: Any) -> str:
        try:
            folds = self.folds
        except AttributeError:
            folds = self.folds = {}
        text = folds.get(policy)
        if text is None:
            text = folds[policy] = super().fold(policy=policy)
        return text


class HeaderClasses(HeaderRegistry):
    """The policy's `header_factory` for acknowledgements: `HeaderRegistry` with two savings.

    `HeaderRegistry[name]` builds a new class each time it is asked, and a message asks twice
    for every header it sets (the header's class and its `max_count`): here each name's class is
    made once. And the headers that are the same in every acknowledgement (the RFC 3834 ones,
    and those `set_content` writes: MIME-Version, Content-Type, Content-Transfer-Encoding; Date
    within a second) are parsed once: a header object is an immutable string, so the same one
    serves every message (and folds itself once, `FoldedOnce`). Together these were two thirds
    of an acknowledgement's CPU."""

    MAX_NAMES = 256  # header names whose class is kept (we set few; a bound all the same)
    SHARED = frozenset(
        {
            "auto-submitted",
            "x-auto-response-suppress",
            "precedence",
            "mime-version",
            "content-type",
            "content-transfer-encoding",
            "date",
        }
    )

    def __init__(self) -> None:
        super().__init__(base_class=FoldedOnce)
        self.classes: dict[str, Any] = {}
        self.shared = functools.lru_cache(maxsize=64)(self.make)

    def __getitem__(self, name: str) -> Any:
        key = name.lower()
        cls = self.classes.get(key)
        if cls is None:
            cls = super().__getitem__(name)
            if len(self.classes) < self.MAX_NAMES:
                self.classes[key] = cls
        return cls

    def __call__(self, name: str, value: Any) -> Any:
        if isinstance(value, str) and name.lower() in self.SHARED:
            return self.shared(name, value)
        return self.make(name, value)

    def make(self, name: str, value: Any) -> Any:
        return self[name](name, value)


HEADERS = HeaderClasses()
# the relay may not offer 8BITMIME: a text that is not ASCII goes quoted-printable or base64
SMTP_7BIT = policy.SMTP.clone(cte_type="7bit", header_factory=HEADERS)
SMTPUTF8 = policy.SMTPUTF8.clone(header_factory=HEADERS)
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
    msg_id = f"ack.{uuid.uuid4().hex}@{hostname}"
    # policy.SMTP folds long headers (RFC 2047 where a word alone is too long) and keeps lines
    # within 998 octets; an address that is not ASCII needs SMTPUTF8 (policy.SMTPUTF8: headers
    # in UTF-8), which the sender asks of the relay (`needs_smtputf8`)
    utf8 = not (_one_line(rcpt).isascii() and from_address.isascii())
    msg = EmailMessage(policy=SMTPUTF8 if utf8 else SMTP_7BIT)
    msg["From"] = _from_header(from_name, from_address)
    msg["To"] = _one_line(rcpt)
    msg["Subject"] = " ".join(subject.split())
    msg["Date"] = formatdate(localtime=False, usegmt=True)
    msg["Message-ID"] = f"<{msg_id}>"
    if mail.message_id:
        msg["In-Reply-To"] = f"<{_one_line(mail.message_id)}>"
        refs = [*mail.references[-10:], mail.message_id]
        msg["References"] = " ".join(f"<{_one_line(r)}>" for r in refs)
    msg["Auto-Submitted"] = "auto-replied"
    msg["X-Auto-Response-Suppress"] = "All"
    msg["Precedence"] = "auto_reply"
    text = body.replace("\r\n", "\n").replace("\r", "\n")
    msg.set_content(text, charset="utf-8")
    if not text:
        msg.set_payload("")  # set_content would end an empty text with a line break
    return msg.as_bytes(), msg_id


@functools.lru_cache(maxsize=16)
def _from_header(from_name: str, from_address: str) -> BaseHeader:
    """The From header object: the same for every acknowledgement of one config (made once)."""
    value: Address | str = (
        Address(display_name=_one_line(from_name), addr_spec=from_address)
        if from_name
        else from_address
    )
    return HEADERS("From", value)


def needs_smtputf8(mail_from: str, rcpt: str, data: bytes) -> bool:
    """True when an acknowledgement can only go out over SMTPUTF8 (RFC 6531)."""
    return not (mail_from.isascii() and rcpt.isascii() and data.isascii())


def _one_line(value: str) -> str:
    """No line breaks inside a header value (a crafted Message-ID must not add headers)."""
    return "".join(value.split("\r")).replace("\n", "").replace("\0", "")


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
        utf8 = needs_smtputf8(mail_from, rcpts[0] if rcpts else "", data)
        # aiosmtplib refuses with SMTPNotSupported when the relay does not offer SMTPUTF8
        await self.client.sendmail(
            mail_from, rcpts, data, mail_options=["SMTPUTF8"] if utf8 else []
        )
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
        spool: Spool,
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
        # the SMTP client library: loaded with the sender (at the worker's start), not by the
        # first acknowledgement on the event loop; processes that send none never load it
        importlib.import_module("aiosmtplib")
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
                    log.error("outbox_read_failed", extra={"fields": {"error": str(exc)}})
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

    async def _drain(self, lane: _RelayConnection, todo: list[AckRow]) -> None:
        while todo and not self._stopping:
            await self._send_one(todo.pop(), lane)

    def _close_idle(self, before: float) -> None:
        for lane in self._lanes:
            if lane.client is not None and lane.last_used < before:
                lane.close_soon()

    def _relay_key(self) -> tuple[Any, ...]:
        return (self.host, self.port, self.relay_tls, self.username, self.password)

    def _client(self) -> aiosmtplib.SMTP:
        import aiosmtplib

        return aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            timeout=self.timeout,
            use_tls=self.relay_tls == "tls",
            start_tls=self.relay_tls == "starttls",
            username=self.username,
            password=self.password,
        )

    async def _send_one(self, ack: AckRow, lane: _RelayConnection | None = None) -> None:
        import aiosmtplib

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
        except aiosmtplib.SMTPNotSupported as exc:
            # the relay works but cannot carry this one (a UTF-8 address without SMTPUTF8):
            # a permanent failure of this acknowledgement, not an outage of the outbox
            await self._failed(ack, f"relay cannot send it: {exc}", permanent=True)
            return
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
            await self._failed(ack, f"relay unreachable: {exc}", False, unreachable=True)
            return
        except Exception as exc:  # never let one acknowledgement stop the sender
            await lane.close()
            log.exception("ack_error", extra={"fields": {"ack": ack.id}})
            await self._failed(ack, f"internal error: {type(exc).__name__}: {exc}", False)
            return
        await self.spool.ack_result(ack.id, sent=True)
        self.sent += 1
        if self.metrics is not None:
            self.metrics.count("acks_sent")
        if self.status is not None:
            self.status.set_ok()
        log.info("ack_sent", extra={"fields": {"ack": ack.id, "message": ack.message_id}})

    async def _failed(
        self, ack: AckRow, error: str, permanent: bool, *, unreachable: bool = False
    ) -> None:
        """Record one acknowledgement's failure. Only an unreachable relay marks the outbox
        down (/healthz); what the relay refused for this message concerns this message."""
        if permanent or ack.attempts + 1 >= self.max_attempts:
            self.failed += 1
            await self.spool.ack_result(ack.id, sent=False, error=error)
            log.warning(
                "ack_failed",
                extra={"fields": {"ack": ack.id, "message": ack.message_id, "error": error}},
            )
            return
        delay = retry.ACK.delay(ack.attempts + 1)
        await self.spool.ack_result(ack.id, sent=False, error=error, retry_in=delay)
        if self.status is not None and unreachable:
            self.status.set_down(error)
        log.info(
            "ack_deferred",
            extra={"fields": {"ack": ack.id, "retry_in": f"{delay:.1f}", "error": error}},
        )

    def stop(self) -> None:
        self._stopping = True
        self.wake.set()
