"""The WHMCS backend: tickets through the WHMCS External API (shared/contracts/whmcs.md).

Owns `WhmcsConfig` (`[backends.NAME]` with `type = "whmcs"`), `WhmcsTicket` (the rule fields of
this type) and `WhmcsBackend`, which speaks the form-encoded `action=...` API over httpx:

- new ticket: optional client look-up (GetClientsDetails by the sender's e-mail, cached), then one
  OpenTicket call carrying text, custom fields (base64 of PHP `serialize()`) and attachments
  (base64 of a JSON list); the ticket's `id` is the internal id, its `ref` the public `tid`;
- follow-up: GetTicket (whose ticket; a ref the spool did not make, whose id is the public
  `tid`, is resolved by `ticketnum`), then AddTicketReply on the internal id: with `clientid`
  when the ticket belongs to a client and the sender is that client (WHMCS records a reply
  with `name`/`email` as a guest's), else with the sender's `name` and `email`; `noemail` as on
  OpenTicket; Markdown asked for under both documented spellings (`markdown`, `useMarkdown`);
- status: GetTicket; closed is any of `closed_statuses`, by default what the installation's
  GetSupportStatuses marks as closed (asked once an hour; "Closed" when it cannot tell);
- after a crash, GetTickets by e-mail and subject finds the ticket an interrupted OpenTicket
  made (confirmed by comparing the first message's text).

WHMCS's error signalling is mapped at one boundary (`_call`): authentication and IP refusals,
unknown commands and missing permissions (by their messages, whatever the status) →
`BackendUnavailable`; `result=error` with a business message → `PermanentError(message)`; any
other HTTP status, timeouts, connection errors and answers too large → the one mapping shared by
all backends (`gateway.backends.http`: 5xx/429 transient with Retry-After, ...).
"""

from __future__ import annotations

import asyncio
import base64
import html
import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote_plus, urlencode

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gateway.backends.base import Progress
from gateway.backends.config import Priority, WhmcsConfig
from gateway.backends.http import ResponseBudget, make_client, status_error, transport_error
from gateway.backends.text import reply_view, select_attachments, ticket_text
from gateway.errors import BackendUnavailable, PermanentError, TransientError
from gateway.models import Attachment, Decision, ParsedMail, TicketRef
from gateway.secrets import resolve_secret

log = logging.getLogger("gateway.backend.whmcs")

SYSTEM = "whmcs"
STEP_OPEN = "OpenTicket"
STEP_REPLY = "AddTicketReply"

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
DEFAULT_CLOSED = frozenset({"closed"})
STATUSES_TTL = 3600.0  # seconds GetSupportStatuses' answer is kept
TICKET_TTL = 30.0  # seconds a GetTicket answer serves the follow-up that asked for its status
_FALSE = ("0", "false", "no", "off", "")
_TAG_RE = re.compile(r"<[^>]*>")
_SPACE_RE = re.compile(r"\s+")


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


_B64_PIECE = 3 * 65536  # bytes base64-encoded at a time (a multiple of 3: no padding inside)


def _attachments_json(attachments: list[Attachment]) -> Iterator[bytes]:
    """The JSON of `encode_attachments`, byte for byte, in pieces (each `data` encoded as it
    goes)."""
    yield b"["
    for i, a in enumerate(attachments):
        name = json.dumps(a.filename or "attachment").encode("ascii")
        yield (b", " if i else b"") + b'{"name": ' + name + b', "data": "'
        view = memoryview(a.data)
        for start in range(0, len(view), _B64_PIECE):
            yield base64.b64encode(view[start : start + _B64_PIECE])
        yield b'"}'
    yield b"]"


def attachments_form_value(attachments: list[Attachment]) -> Iterator[bytes]:
    """`encode_attachments(...)` form-encoded (as `urlencode` would), produced in pieces: the
    outer base64 over the JSON as it is made, each piece quoted. Never holds the whole."""
    pending = b""
    for piece in _attachments_json(attachments):
        pending += piece
        if len(pending) >= _B64_PIECE:
            cut = len(pending) - len(pending) % 3
            yield quote_plus(base64.b64encode(pending[:cut])).encode("ascii")
            pending = pending[cut:]
    if pending:
        yield quote_plus(base64.b64encode(pending)).encode("ascii")


def encode_attachments(attachments: list[Attachment]) -> str:
    """base64 of a JSON list of `{name, data: base64}` (OpenTicket / AddTicketReply)."""
    items = [
        {"name": a.filename or "attachment", "data": base64.b64encode(a.data).decode("ascii")}
        for a in attachments
    ]
    return base64.b64encode(json.dumps(items).encode("utf-8")).decode("ascii")


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


async def _form_stream(head: bytes, attachments: list[Attachment]) -> AsyncIterator[bytes]:
    yield head
    for piece in attachments_form_value(attachments):
        yield piece


class WhmcsBackend:
    """A WHMCS installation reached over its External API. See `Backend`."""

    system = SYSTEM
    searchable = True  # find_existing searches the system

    def __init__(
        self,
        name: str,
        cfg: WhmcsConfig,
        *,
        base_dir: Path,
        budget: ResponseBudget | None = None,
    ) -> None:
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
            timeout=cfg.timeout,
            concurrency=cfg.concurrency,
            max_response_bytes=cfg.max_response_bytes,
            budget=budget,
        )
        self._clients: dict[str, tuple[float, str | None]] = {}  # e-mail → (expiry, client id)
        self._closed: tuple[float, frozenset[str]] | None = None  # (expiry, lower-case titles)
        self._tickets: dict[str, tuple[float, dict[str, Any]]] = {}  # id or tid → GetTicket

    # -- the one boundary where WHMCS's and httpx's errors become ours ---------------------------

    async def _call(
        self,
        action: str,
        params: Mapping[str, str],
        attachments: list[Attachment] | None = None,
    ) -> dict[str, Any]:
        """POST one API command; return the success answer or raise a `BackendError`.

        `attachments` go out as the `attachments` field, encoded piece by piece as the request
        is sent (a first pass over the pieces counts its length; nothing is held whole)."""
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
                if attachments:
                    head = (urlencode(form) + "&attachments=").encode("ascii")
                    length = len(head) + sum(len(p) for p in attachments_form_value(attachments))
                    resp = await self._client.post(
                        self.url,
                        content=_form_stream(head, attachments),
                        headers={
                            "Content-Type": "application/x-www-form-urlencoded",
                            "Content-Length": str(length),
                        },
                    )
                else:
                    resp = await self._client.post(self.url, data=form)
            except (httpx.HTTPError, httpx.InvalidURL) as exc:
                log.warning(
                    "whmcs_connection_error",
                    extra={
                        "fields": {
                            "backend": self.name,
                            "action": action,
                            "error": type(exc).__name__,
                        }
                    },
                )
                raise transport_error(f"WHMCS {action}", exc) from exc
        elapsed_ms = int((time.monotonic() - started) * 1000)
        status = resp.status_code
        if status == 429 or status >= 500:
            busy = status_error(f"WHMCS {action}", status, resp.headers)
            log.warning(
                "whmcs_busy",
                extra={
                    "fields": {
                        "backend": self.name,
                        "action": action,
                        "http": status,
                        "retry_after": busy.retry_after,
                        "ms": elapsed_ms,
                    }
                },
            )
            raise busy
        data = _parse_body(resp.text)
        message = str(data.get("message", "")).strip() if data else ""
        result = str(data.get("result", "")).lower() if data else ""
        log.info(
            "whmcs_call",
            extra={
                "fields": {
                    "backend": self.name,
                    "action": action,
                    "http": status,
                    "result": result or "-",
                    "ms": elapsed_ms,
                }
            },
        )
        low = message.lower()
        if status in (401, 403) or low.startswith(_UNAVAILABLE_MESSAGES):
            log.error(
                "whmcs_refused",
                extra={
                    "fields": {
                        "backend": self.name,
                        "action": action,
                        "http": status,
                        "message": message,
                    }
                },
            )
            raise BackendUnavailable(f"WHMCS refused the API credentials: {message or status}")
        if status >= 300:
            err = status_error(f"WHMCS {action}", status, resp.headers)
            raise type(err)(f"{err} {message}".rstrip(), retry_after=err.retry_after)
        if data is None or result not in ("success", "error"):
            raise BackendUnavailable(f"WHMCS {action}: the answer is not a WHMCS API result")
        if result == "error":
            # "Client Not Found" of GetClientsDetails is the normal answer for a new sender, not
            # an error: lookup_client logs it as event=whmcs_client_lookup found=False
            if not (action == "GetClientsDetails" and _NOT_FOUND in low):
                log.info(
                    "whmcs_error",
                    extra={"fields": {"backend": self.name, "action": action, "message": message}},
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
        log.info(
            "whmcs_client_lookup",
            extra={"fields": {"backend": self.name, "found": client_id is not None}},
        )
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

    async def _get_ticket(self, ref: TicketRef) -> dict[str, Any]:
        """GetTicket by internal id, or by `ticketnum` for a ref whose id is the public `tid`
        (a ticket the spool did not make). Kept briefly: a follow-up asks for the status first,
        then who the ticket belongs to."""
        if ref.id.isdigit() and ref.id != ref.ref:
            key, params = ref.id, {"ticketid": ref.id}
        else:
            key, params = f"tid:{ref.ref or ref.id}", {"ticketnum": ref.ref or ref.id}
        now = time.monotonic()
        cached = self._tickets.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        data = await self._call("GetTicket", params)
        self._tickets = {k: v for k, v in self._tickets.items() if v[0] > now}
        self._tickets[key] = (now + TICKET_TTL, data)
        return data

    async def _reply_author(self, ticket: Mapping[str, Any], mail: ParsedMail) -> dict[str, str]:
        """`clientid` when the ticket is a client's and the sender is that client; else the
        sender's `name` and `email` (a guest reply)."""
        userid = str(ticket.get("userid") or "0").strip()
        if userid not in ("", "0") and mail.from_addr:
            owner = str(ticket.get("email") or "").strip().lower()
            if mail.from_addr.lower() == owner:
                return {"clientid": userid}
            if self.cfg.client_lookup and await self.lookup_client(mail.from_addr) == userid:
                return {"clientid": userid}
        return self._sender(mail)

    async def closed_statuses(self) -> frozenset[str]:
        """Lower-case titles of the statuses that count as closed (see the module docstring).

        GetSupportStatuses documents `title` and `count` per status; a status entry that says
        it is not active (`showactive` false, as WHMCS stores "Include in Active Tickets") or
        closed (`closed` true) is taken as closed besides "Closed". Any failure: "Closed".
        """
        if self.cfg.closed_statuses is not None:
            return frozenset(s.strip().lower() for s in self.cfg.closed_statuses if s.strip())
        now = time.monotonic()
        if self._closed is not None and self._closed[0] > now:
            return self._closed[1]
        closed = set(DEFAULT_CLOSED)
        try:
            data = await self._call("GetSupportStatuses", {})
        except (PermanentError, TransientError, BackendUnavailable) as exc:
            log.info(
                "whmcs_statuses_unknown", extra={"fields": {"backend": self.name, "error": exc}}
            )
            data = {}
        for entry in _listing(data, "statuses", "status"):
            title = str(entry.get("title") or "").strip().lower()
            active = str(entry.get("showactive", "1")).strip().lower()
            flagged = str(entry.get("closed", "0")).strip().lower()
            if title and (active in _FALSE or flagged not in _FALSE):
                closed.add(title)
        self._closed = (now + STATUSES_TTL, frozenset(closed))
        log.info(
            "whmcs_closed_statuses",
            extra={"fields": {"backend": self.name, "closed": sorted(closed)}},
        )
        return self._closed[1]

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
        if fields.noemail if fields.noemail is not None else self.cfg.noemail:
            params["noemail"] = "1"
        if self.cfg.markdown:  # the docs name it both ways
            params["markdown"] = params["useMarkdown"] = "1"
        await progress.begin(STEP_OPEN)
        data = await self._call("OpenTicket", params, attachments)
        ticket_id, tid = str(data.get("id") or ""), str(data.get("tid") or "")
        if not ticket_id or not tid:
            raise BackendUnavailable("WHMCS OpenTicket: success without id and tid")
        await progress.done(STEP_OPEN, id=ticket_id, tid=tid)
        log.info(
            "ticket_opened",
            extra={
                "fields": {
                    "backend": self.name,
                    "id": ticket_id,
                    "ref": tid,
                    "deptid": params["deptid"],
                    "attachments": len(attachments),
                }
            },
        )
        return TicketRef(self.name, self.system, ticket_id, tid)

    async def add_message(
        self, ref: TicketRef, mail: ParsedMail, progress: Progress, *, automatic: bool = False
    ) -> None:
        mail = reply_view(mail, self.cfg.quoted, followup=True)
        if STEP_REPLY in progress.data:
            return
        ticket = await self._get_ticket(ref)
        ticket_id = str(ticket.get("ticketid") or ticket.get("id") or "")
        if not ticket_id:
            raise PermanentError(f"WHMCS GetTicket: no ticket id for {ref.ref}")
        text, attachments = self._text(mail, automatic=automatic)
        who = await self._reply_author(ticket, mail)
        params = {"ticketid": ticket_id, "message": text, **who}
        if self.cfg.noemail:
            params["noemail"] = "1"
        if self.cfg.markdown:  # the docs name it both ways
            params["markdown"] = params["useMarkdown"] = "1"
        await progress.begin(STEP_REPLY)
        await self._call("AddTicketReply", params, attachments)
        await progress.done(STEP_REPLY, ticketid=ticket_id)
        log.info(
            "message_added",
            extra={
                "fields": {
                    "backend": self.name,
                    "id": ticket_id,
                    "ref": ref.ref,
                    "attachments": len(attachments),
                    "automatic": automatic,
                    "as": "client" if "clientid" in who else "guest",
                }
            },
        )

    async def ticket_status(self, ref: TicketRef) -> str | None:
        self._tickets.clear()  # a fresh answer: the status is what is asked
        data = await self._get_ticket(ref)
        status = str(data.get("status", "")).strip()
        if not status:
            return None
        return "closed" if status.lower() in await self.closed_statuses() else "open"

    async def possible_first(self, ref: TicketRef, mail: ParsedMail) -> str | None:
        """See `Backend`. Searchable: `find_existing` answers instead."""
        return None

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
                    "ticket_found",
                    extra={
                        "fields": {"backend": self.name, "id": ticket_id, "ref": ticket.get("tid")}
                    },
                )
                return TicketRef(self.name, self.system, ticket_id, str(ticket.get("tid", "")))
        return None

    async def aclose(self) -> None:
        await self._client.aclose()
