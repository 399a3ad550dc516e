"""The WHMCS backend: tickets through the WHMCS External API (shared/contracts/whmcs.md).

Owns `WhmcsConfig` (`[backends.NAME]` with `type = "whmcs"`), `WhmcsTicket` (the rule fields of
this type) and `WhmcsBackend`, which speaks the form-encoded `action=...` API over httpx:

- new ticket: optional client look-up (GetClientsDetails by the sender's e-mail, cached), then one
  OpenTicket call carrying text, custom fields (base64 of PHP `serialize()`) and attachments
  (base64 of a JSON list); the ticket's `id` is the internal id, its `ref` the public `tid`;
- follow-up: AddTicketReply on the internal id (a ref the spool did not make, whose id is the
  public `tid`, is first resolved with GetTicket `ticketnum`);
- status: GetTicket; after a crash, GetTickets by e-mail and subject finds the ticket an
  interrupted OpenTicket made (confirmed by comparing the first message's text).

WHMCS's error signalling is mapped at one boundary (`_call`): authentication and IP refusals,
unknown commands, missing permissions and other HTTP 4xx → `BackendUnavailable`; `result=error`
with a business message → `PermanentError(message)`; HTTP 5xx/429, timeouts and connection
errors → `TransientError` (honouring Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import html
import json
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from gateway.backends.base import Progress
from gateway.backends.config import BackendConfigBase
from gateway.backends.http import make_client
from gateway.backends.text import reply_view, select_attachments, ticket_text
from gateway.errors import BackendUnavailable, PermanentError, TransientError
from gateway.models import Attachment, Decision, ParsedMail, TicketRef
from gateway.secrets import resolve_secret

log = logging.getLogger("gateway.backend.whmcs")

SYSTEM = "whmcs"
STEP_OPEN = "OpenTicket"
STEP_REPLY = "AddTicketReply"
Priority = Literal["Low", "Medium", "High"]

# Error messages (lower-case prefixes) that mean the installation refuses the gateway itself.
_UNAVAILABLE_MESSAGES = (
    "authentication failed",
    "invalid ip",
    "invalid access key",
    "invalid or missing access key",
    "invalid permissions",
    "access denied",
    "command not found",
    "invalid api action",
)
_NOT_FOUND = "not found"
_TAG_RE = re.compile(r"<[^>]*>")
_SPACE_RE = re.compile(r"\s+")


class WhmcsConfig(BackendConfigBase):
    """`[backends.NAME]` with `type = "whmcs"`; `url` is the WHMCS root or its `.../api.php`."""

    type: Literal["whmcs"]
    identifier: str = Field(min_length=1)  # API credential identifier
    secret: SecretStr | None = None  # API credential secret (or secret_file / secret_env)
    secret_file: str | None = None
    secret_env: str | None = None
    accesskey: SecretStr | None = None  # configuration.php $api_access_key: skips the IP check
    accesskey_file: str | None = None
    accesskey_env: str | None = None
    default_deptid: int = Field(1, ge=1)  # department when the rule names none
    default_priority: Priority = "Medium"
    noemail: bool = True  # keep WHMCS's own confirmation off: the gateway acknowledges
    markdown: bool = False  # ask WHMCS to render the ticket text as Markdown
    client_lookup: bool = True  # find the client by the sender's e-mail unless the rule says
    client_cache_seconds: float = Field(
        300.0, ge=0
    )  # look-up results (found or not) kept this long


class WhmcsTicket(BaseModel):
    """The ticket fields a rule may set for a `whmcs` backend (DESIGN, one spelling each)."""

    model_config = ConfigDict(extra="forbid")

    deptid: int | None = Field(None, ge=1)
    priority: Priority | None = None
    serviceid: int | None = Field(None, ge=1)
    customfields: dict[int, str | int | float | bool] | None = None  # custom field id → value
    client: Literal["lookup"] | int | None = None  # "lookup" by sender e-mail, or a client id
    noemail: bool | None = None


TICKET_FIELDS = frozenset(WhmcsTicket.model_fields)


def api_url(url: str) -> str:
    """The API endpoint: a URL ending in `.php` as given, else `<url>/includes/api.php`."""
    if url.rstrip("/").endswith(".php"):
        return url.rstrip("/")
    return url.rstrip("/") + "/includes/api.php"


def _php_string(value: str) -> str:
    return f's:{len(value.encode("utf-8"))}:"{value}";'


def encode_customfields(fields: Mapping[int, str | int | float | bool]) -> str:
    """base64 of PHP `serialize(array(id => value))`, as OpenTicket's `customfields` expects.

    Keys are integers, as PHP makes of numeric array keys; a checkbox value True becomes "on".
    """
    parts = [f"a:{len(fields)}:{{"]
    for key, value in fields.items():
        if isinstance(value, bool):
            text = "on" if value else ""
        else:
            text = str(value)
        parts.append(f"i:{int(key)};{_php_string(text)}")
    parts.append("}")
    return base64.b64encode("".join(parts).encode("utf-8")).decode("ascii")


def encode_attachments(attachments: list[Attachment]) -> str:
    """base64 of a JSON list of `{name, data: base64}` (OpenTicket / AddTicketReply)."""
    items = [
        {"name": a.filename or "attachment", "data": base64.b64encode(a.data).decode("ascii")}
        for a in attachments
    ]
    return base64.b64encode(json.dumps(items).encode("utf-8")).decode("ascii")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _parse_body(text: str) -> dict[str, Any] | None:
    """The JSON object of an answer; tolerates a BOM or PHP notices printed before it."""
    text = text.lstrip("\ufeff \r\n\t")
    for candidate in (text, text[text.find("{") :] if "{" in text else ""):
        if not candidate:
            continue
        try:
            data = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(data, dict):
            return data
    return None


def _normalise(text: str) -> str:
    """Text as GetTicket gives it back (tags stripped), compared without layout differences."""
    return _SPACE_RE.sub(" ", html.unescape(_TAG_RE.sub("", text))).strip()


def _listing(data: Mapping[str, Any], outer: str, inner: str) -> list[dict[str, Any]]:
    """`{"tickets": {"ticket": [...]}}` → list; tolerates a missing, empty or single entry."""
    box = data.get(outer)
    if not isinstance(box, dict):
        return []
    items = box.get(inner)
    if isinstance(items, dict):
        items = [items]
    if not isinstance(items, list):
        return []
    return [i for i in items if isinstance(i, dict)]


class WhmcsBackend:
    """A WHMCS installation reached over its External API. See `Backend`."""

    system = SYSTEM

    def __init__(self, name: str, cfg: WhmcsConfig, *, base_dir: Path) -> None:
        self.name = name
        self.cfg = cfg
        self.url = api_url(cfg.url)
        secret = resolve_secret(
            cfg.secret,
            cfg.secret_file,
            cfg.secret_env,
            what=f"backends.{name}.secret",
            base_dir=base_dir,
        )
        assert secret is not None  # required=True
        self._secret = secret
        self._accesskey = resolve_secret(
            cfg.accesskey,
            cfg.accesskey_file,
            cfg.accesskey_env,
            what=f"backends.{name}.accesskey",
            base_dir=base_dir,
            required=False,
        )
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._client = make_client(
            timeout=cfg.timeout, concurrency=cfg.concurrency, follow_redirects=False
        )
        self._clients: dict[str, tuple[float, str | None]] = {}  # e-mail → (expiry, client id)

    # -- the one boundary where WHMCS's and httpx's errors become ours ---------------------------

    async def _call(self, action: str, params: Mapping[str, str]) -> dict[str, Any]:
        """POST one API command; return the success answer or raise a `BackendError`."""
        form = {
            "action": action,
            "identifier": self.cfg.identifier,
            "secret": self._secret.get_secret_value(),
            "responsetype": "json",
            **params,
        }
        if self._accesskey is not None:
            form["accesskey"] = self._accesskey.get_secret_value()
        started = time.monotonic()
        async with self._sem:
            try:
                resp = await self._client.post(self.url, data=form)
            except httpx.TimeoutException as exc:
                log.warning("event=whmcs_timeout backend=%s action=%s", self.name, action)
                raise TransientError(f"WHMCS {action}: timeout ({type(exc).__name__})") from exc
            except httpx.UnsupportedProtocol as exc:
                raise BackendUnavailable(f"WHMCS url is not http(s): {self.url}") from exc
            except httpx.TransportError as exc:
                log.warning(
                    "event=whmcs_connection_error backend=%s action=%s error=%s",
                    self.name,
                    action,
                    type(exc).__name__,
                )
                raise TransientError(
                    f"WHMCS {action}: connection failed ({type(exc).__name__})"
                ) from exc
            except httpx.InvalidURL as exc:
                raise BackendUnavailable(f"WHMCS url is invalid: {exc}") from exc
        elapsed_ms = int((time.monotonic() - started) * 1000)
        status = resp.status_code
        if status == 429 or status >= 500:
            retry = _retry_after(resp.headers.get("Retry-After"))
            log.warning(
                "event=whmcs_busy backend=%s action=%s http=%d retry_after=%s ms=%d",
                self.name,
                action,
                status,
                retry,
                elapsed_ms,
            )
            raise TransientError(f"WHMCS {action}: HTTP {status}", retry_after=retry)
        data = _parse_body(resp.text)
        message = str(data.get("message", "")).strip() if data else ""
        result = str(data.get("result", "")).lower() if data else ""
        log.info(
            "event=whmcs_call backend=%s action=%s http=%d result=%s ms=%d",
            self.name,
            action,
            status,
            result or "-",
            elapsed_ms,
        )
        low = message.lower()
        if status in (401, 403) or low.startswith(_UNAVAILABLE_MESSAGES):
            log.error(
                "event=whmcs_refused backend=%s action=%s http=%d message=%r",
                self.name,
                action,
                status,
                message,
            )
            raise BackendUnavailable(f"WHMCS refused the API credentials: {message or status}")
        if status >= 300:
            raise BackendUnavailable(f"WHMCS {action}: HTTP {status} {message}".rstrip())
        if data is None or result not in ("success", "error"):
            raise BackendUnavailable(f"WHMCS {action}: the answer is not a WHMCS API result")
        if result == "error":
            # "Client Not Found" of GetClientsDetails is the normal answer for a new sender, not
            # an error: lookup_client logs it as event=whmcs_client_lookup found=False
            if not (action == "GetClientsDetails" and _NOT_FOUND in low):
                log.info(
                    "event=whmcs_error backend=%s action=%s message=%r", self.name, action, message
                )
            raise PermanentError(f"WHMCS {action}: {message or 'error without message'}")
        return data

    # -- helpers --------------------------------------------------------------------------------

    def _fields(self, decision: Decision) -> WhmcsTicket:
        try:
            return WhmcsTicket.model_validate(decision.ticket)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
            )
            raise PermanentError(f"invalid whmcs ticket fields: {problems}") from exc

    @staticmethod
    def _subject(mail: ParsedMail) -> str:
        return mail.subject.strip() or "(no subject)"

    @staticmethod
    def _sender(mail: ParsedMail) -> dict[str, str]:
        addr = mail.from_addr
        return {"name": mail.from_name or addr.split("@", 1)[0] or addr, "email": addr}

    async def lookup_client(self, address: str) -> str | None:
        """The id of the client whose e-mail is `address`, or None; cached per config."""
        key = address.strip().lower()
        if not key:
            return None
        now = time.monotonic()
        cached = self._clients.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            data = await self._call("GetClientsDetails", {"email": key, "stats": "false"})
        except PermanentError as exc:
            if _NOT_FOUND not in str(exc).lower():
                raise
            client_id: str | None = None
        else:
            nested = data.get("client")
            client: dict[str, Any] = nested if isinstance(nested, dict) else data
            raw = client.get("id") or client.get("userid") or data.get("userid")
            client_id = str(raw) if raw else None
        self._clients[key] = (now + self.cfg.client_cache_seconds, client_id)
        log.info("event=whmcs_client_lookup backend=%s found=%s", self.name, client_id is not None)
        return client_id

    async def _who(self, fields: WhmcsTicket, mail: ParsedMail) -> dict[str, str]:
        """Whose ticket: `clientid`, or `name` + `email` of the sender."""
        if isinstance(fields.client, int):
            return {"clientid": str(fields.client)}
        if fields.client == "lookup" or (fields.client is None and self.cfg.client_lookup):
            client_id = await self.lookup_client(mail.from_addr)
            if client_id is not None:
                return {"clientid": client_id}
        return self._sender(mail)

    def _text(self, mail: ParsedMail, *, automatic: bool = False) -> tuple[str, list[Attachment]]:
        keep, skipped = select_attachments(
            mail,
            max_bytes=self.cfg.max_attachment_bytes,
            max_total=self.cfg.max_total_attachment_bytes,
            blocked_extensions=self.cfg.blocked_extensions,
        )
        text = ticket_text(
            mail,
            header_fields=self.cfg.header_fields,
            max_chars=self.cfg.max_body_chars,
            not_forwarded=skipped,
            automatic=automatic,
        )
        return text, keep

    async def _ticket_id(self, ref: TicketRef) -> str:
        """The internal id AddTicketReply takes. A ref whose id is its public `tid` (a ticket
        the spool did not make) is resolved with GetTicket `ticketnum`."""
        if ref.id.isdigit() and ref.id != ref.ref:
            return ref.id
        data = await self._call("GetTicket", {"ticketnum": ref.ref or ref.id})
        ticket_id = str(data.get("ticketid") or data.get("id") or "")
        if not ticket_id:
            raise PermanentError(f"WHMCS GetTicket: no ticket id for {ref.ref}")
        return ticket_id

    # -- Backend --------------------------------------------------------------------------------

    async def open_ticket(
        self, decision: Decision, mail: ParsedMail, progress: Progress
    ) -> TicketRef:
        mail = reply_view(mail, self.cfg.quoted, followup=False)
        done = progress.data.get(STEP_OPEN)
        if done:  # a previous attempt got its answer recorded: never create twice
            return TicketRef(self.name, self.system, str(done["id"]), str(done["tid"]))
        fields = self._fields(decision)
        text, attachments = self._text(mail)
        params: dict[str, str] = {
            "deptid": str(fields.deptid or self.cfg.default_deptid),
            "subject": self._subject(mail),
            "message": text,
            "priority": fields.priority or self.cfg.default_priority,
            **await self._who(fields, mail),
        }
        if fields.serviceid is not None:
            params["serviceid"] = str(fields.serviceid)
        if fields.customfields:
            params["customfields"] = encode_customfields(fields.customfields)
        if attachments:
            params["attachments"] = encode_attachments(attachments)
        if fields.noemail if fields.noemail is not None else self.cfg.noemail:
            params["noemail"] = "1"
        if self.cfg.markdown:
            params["markdown"] = "1"
        await progress.begin(STEP_OPEN)
        data = await self._call("OpenTicket", params)
        ticket_id, tid = str(data.get("id") or ""), str(data.get("tid") or "")
        if not ticket_id or not tid:
            raise BackendUnavailable("WHMCS OpenTicket: success without id and tid")
        await progress.done(STEP_OPEN, id=ticket_id, tid=tid)
        log.info(
            "event=ticket_opened backend=%s id=%s ref=%s deptid=%s attachments=%d",
            self.name,
            ticket_id,
            tid,
            params["deptid"],
            len(attachments),
        )
        return TicketRef(self.name, self.system, ticket_id, tid)

    async def add_message(
        self, ref: TicketRef, mail: ParsedMail, progress: Progress, *, automatic: bool = False
    ) -> None:
        mail = reply_view(mail, self.cfg.quoted, followup=True)
        if STEP_REPLY in progress.data:
            return
        ticket_id = await self._ticket_id(ref)
        text, attachments = self._text(mail, automatic=automatic)
        params = {"ticketid": ticket_id, "message": text, **self._sender(mail)}
        if attachments:
            params["attachments"] = encode_attachments(attachments)
        if self.cfg.markdown:
            params["markdown"] = "1"
        await progress.begin(STEP_REPLY)
        await self._call("AddTicketReply", params)
        await progress.done(STEP_REPLY, ticketid=ticket_id)
        log.info(
            "event=message_added backend=%s id=%s ref=%s attachments=%d automatic=%s",
            self.name,
            ticket_id,
            ref.ref,
            len(attachments),
            automatic,
        )

    async def ticket_status(self, ref: TicketRef) -> str | None:
        if ref.id.isdigit() and ref.id != ref.ref:
            params = {"ticketid": ref.id}
        else:
            params = {"ticketnum": ref.ref or ref.id}
        data = await self._call("GetTicket", params)
        status = str(data.get("status", "")).strip()
        if not status:
            return None
        return "closed" if status.lower() == "closed" else "open"

    async def find_existing(self, decision: Decision, mail: ParsedMail) -> TicketRef | None:
        fields = self._fields(decision)
        subject = self._subject(mail)
        who = await self._who(fields, mail)
        params = {"subject": subject, "limitnum": "10"}
        if "clientid" in who:
            params["clientid"] = who["clientid"]
        else:
            params["email"] = who["email"]
        data = await self._call("GetTickets", params)
        expected = _normalise(self._text(mail)[0])
        for ticket in _listing(data, "tickets", "ticket"):  # newest first
            if str(ticket.get("subject", "")).strip().lower() != subject.lower():
                continue
            ticket_id = str(ticket.get("id") or "")
            try:
                detail = await self._call("GetTicket", {"ticketid": ticket_id})
            except PermanentError:
                continue
            replies = _listing(detail, "replies", "reply")
            if replies and _normalise(str(replies[0].get("message", ""))) == expected:
                log.info(
                    "event=ticket_found backend=%s id=%s ref=%s",
                    self.name,
                    ticket_id,
                    ticket.get("tid"),
                )
                return TicketRef(self.name, self.system, ticket_id, str(ticket.get("tid", "")))
        return None

    async def aclose(self) -> None:
        await self._client.aclose()
