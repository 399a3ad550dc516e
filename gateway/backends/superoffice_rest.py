"""The SuperOffice WebAPI (REST) backend: `SuperOfficeRestConfig` and `SuperOfficeRestBackend`.

Owns the `[backends.NAME]` keys of type "superoffice-rest", the calls to the WebAPI's Ticket agent
(shared/contracts/superoffice-rest.md) and the translation of its HTTP answers into the error tree.

A new ticket (see `Backend`):

    [person lookup, cached]  GET  /api/v1/Person?$filter=personEmail/emailAddress eq '<sender>'
    CreateDefaultTicketEntity → fill Title/Category/Priority/Slevel/Person/FromAddress
    SaveTicketEntity                                  progress step "ticket"   {id, person}
    per attachment: SaveAttachmentEntity + UploadAttachment (base64)
                                                      progress step "attachments" {ids}
    CreateDefaultTicketMessageEntity → Body/HtmlBody/Author/MessageId/Person/Ticket.TicketId
      (Body is always the text; a mail with an HTML body also sends it, sanitised by nh3
      (gateway.backends.html), as HtmlBody with Type "Html", and its inline images go with
      InlineImage and ContentId set so the HTML shows them where they stood)
    SaveTicketMessageEntity (…WithNotify when notify) progress step "message"  {id}
    AddAttachments (connects the uploaded files; repeating it is harmless)

A follow-up (`add_message`) is the message part on `ref.id`. Once the person cache and the
credential are warm a ticket without attachments costs 4 calls, plus 2 per attachment and 1 to
connect them. A resumed attempt skips every step `progress.data` records as done; a worker that
found the ticket with `find_existing` may seed `progress.done("ticket", id=ref.id)`.

Credentials (`auth`): "basic" (onsite; username + password), "soticket" (online; ticket +
app_token, sent as `SOTicket` + `SO-AppToken`) or "bearer" (online; access token, optionally
renewed through the OAuth 2.0 refresh grant at `token_url` with client_id, the app token as client
secret, and refresh_token). On a 401 the backend renews once (refresh grant for bearer; for any
scheme whose secret comes from a file or environment variable, it re-reads that source, so an
external renewer such as the SuperOffice system-user flow can keep `ticket_file` fresh) and
retries; a second refusal, or a 403, is `BackendUnavailable`.

Errors: the one mapping shared by all backends (`gateway.backends.http`: 401/403 →
BackendUnavailable, 400 and other 4xx → PermanentError, 408/429/5xx → TransientError with
Retry-After, timeouts and connection errors → TransientError), with the server's message added;
the WebAPI's own addition: a 404 on a call that names an entity means "no such ticket" →
PermanentError (on a call that names none the URL is wrong → BackendUnavailable, as shared).
"""

from __future__ import annotations

import asyncio
import base64
import html as htmllib
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from pydantic import SecretStr

from gateway.backends.base import Progress
from gateway.backends.config import SuperOfficeRestConfig
from gateway.backends.html import safe_html
from gateway.backends.http import ResponseBudget, make_client, status_error, transport_error
from gateway.backends.text import header_block, reply_view, select_attachments, ticket_text
from gateway.errors import (
    BackendError,
    BackendUnavailable,
    PermanentError,
    TransientError,
)
from gateway.models import Attachment, Decision, ParsedMail, TicketRef
from gateway.secrets import SecretError, resolve_secret

SYSTEM = "superoffice-rest"
log = logging.getLogger("gateway.backend.superoffice_rest")

MAX_TITLE_CHARS = 250
MAX_ERROR_CHARS = 300
NEGATIVE_CACHE_SECONDS = 300.0  # an unknown sender is asked again after this long
TICKET_FIELDS = ("category", "priority", "slevel", "person", "notify")
_SLEVELS = {"external": "External", "internal": "Internal", "2": "External", "1": "Internal"}


def validate_ticket_fields(fields: dict[str, Any]) -> list[str]:
    """Problems with a rule's `[rule.ticket]` table for this type (empty list = fine)."""
    problems = []
    for key, value in fields.items():
        if key not in TICKET_FIELDS:
            problems.append(f"unknown superoffice-rest ticket field {key!r}")
        elif key in ("category", "priority"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{key} must be a positive integer id")
        elif key == "slevel":
            if str(value).lower() not in _SLEVELS:
                problems.append("slevel must be 'external', 'internal', 2 or 1")
        elif key == "person":
            ok_id = isinstance(value, int) and not isinstance(value, bool) and value >= 1
            if value != "lookup" and not ok_id:
                problems.append('person must be "lookup" or a positive PersonId')
        elif key == "notify" and not isinstance(value, bool):
            problems.append("notify must be true or false")
    return problems


def _title(mail: ParsedMail) -> str:
    title = " ".join(mail.subject.split()) or "(no subject)"
    return title[:MAX_TITLE_CHARS]


def _odata_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _html_with_header(mail: ParsedMail, fields: list[str]) -> str:
    """The mail's HTML, sanitised (a fragment: no html/head/body), with the sender block on top
    so agents reading HTML see who wrote; "" when the HTML has nothing left to show."""
    html = safe_html(mail.html)
    if not html.strip():
        return ""
    block = header_block(mail, fields)
    if not block:
        return html
    return f"<div><pre>{htmllib.escape(block)}</pre><hr></div>" + html


class _Secret:
    """A secret with its source, so that a file/env source can be read again after a 401."""

    def __init__(
        self,
        inline: SecretStr | None,
        file: str | None,
        env: str | None,
        *,
        what: str,
        base_dir: Path,
    ) -> None:
        self._spec = (inline, file, env)
        self.what, self.base_dir = what, base_dir
        self.rereadable = inline is None and bool(file or env)
        value = resolve_secret(inline, file, env, what=what, base_dir=base_dir, required=False)
        self.value: str | None = value.get_secret_value() if value is not None else None

    def reread(self) -> bool:
        """Read the source again; True when the value changed."""
        if not self.rereadable:
            return False
        inline, file, env = self._spec
        try:
            value = resolve_secret(inline, file, env, what=self.what, base_dir=self.base_dir)
        except SecretError as exc:
            raise BackendUnavailable(str(exc)) from exc
        new = value.get_secret_value() if value is not None else None
        changed = new != self.value
        self.value = new
        return changed


_B64_PIECE = 3 * 65536  # bytes encoded at a time (a multiple of 3: no padding inside)


async def _base64_json(head: bytes, data: bytes, tail: bytes) -> AsyncIterator[bytes]:
    yield head
    view = memoryview(data)
    for start in range(0, len(view), _B64_PIECE):
        yield base64.b64encode(view[start : start + _B64_PIECE])
    yield tail


class SuperOfficeRestBackend:
    """A SuperOffice WebAPI tenant reached over HTTP(S). See `Backend`."""

    system = SYSTEM
    searchable = True  # find_existing searches the system

    def __init__(
        self,
        name: str,
        cfg: SuperOfficeRestConfig,
        *,
        base_dir: Path,
        budget: ResponseBudget | None = None,
    ) -> None:
        self.name = name
        self.cfg = cfg
        base = cfg.url.rstrip("/")
        if base.lower().endswith("/api/v1"):
            base = base[: -len("/api/v1")]
        self._api = base + "/api/v1"

        def secret(key: str) -> _Secret:
            return _Secret(
                getattr(cfg, key),
                getattr(cfg, f"{key}_file"),
                getattr(cfg, f"{key}_env"),
                what=f"backends.{name}.{key}",
                base_dir=base_dir,
            )

        # Each of these raises SecretError (a GatewayError) at start-up when a source is unreadable.
        self._password = secret("password") if cfg.auth == "basic" else None
        self._ticket = secret("ticket") if cfg.auth == "soticket" else None
        self._token = secret("token") if cfg.auth == "bearer" else None
        self._refresh_token = secret("refresh_token") if cfg.auth == "bearer" else None
        self._app_token = secret("app_token")
        self._expires_at: float | None = None  # monotonic time the access token runs out
        self._auth_lock = asyncio.Lock()
        self._sem = asyncio.Semaphore(cfg.concurrency)
        self._persons: dict[str, tuple[int | None, float]] = {}  # email -> (PersonId, expiry)
        self._http = make_client(
            timeout=cfg.timeout,
            concurrency=cfg.concurrency,
            max_response_bytes=cfg.max_response_bytes,
            budget=budget,
            headers={"Accept": "application/json", "User-Agent": "ticket-gateway"},
        )

    # ----------------------------------------------------------------------------- protocol

    async def open_ticket(
        self, decision: Decision, mail: ParsedMail, progress: Progress
    ) -> TicketRef:
        mail = reply_view(mail, self.cfg.quoted, followup=False)
        fields = decision.ticket
        problems = validate_ticket_fields(fields)
        if problems:
            raise PermanentError(f"{self.name}: rule {decision.rule!r}: " + "; ".join(problems))
        done = progress.data.get("ticket") or {}
        ticket_id = str(done["id"]) if done.get("id") else None
        person_id: int | None = done.get("person")
        if ticket_id is None:
            person_id = await self._person_for(fields.get("person", "lookup"), mail)
            entity = await self._call("CreateDefaultTicketEntity", entity_call=False)
            if not isinstance(entity, dict):
                raise TransientError(f"{self.name}: CreateDefaultTicketEntity: no entity returned")
            self._fill_ticket(entity, fields, mail, person_id)
            await progress.begin("ticket")
            saved = await self._call("SaveTicketEntity", json=entity, entity_call=False)
            ticket_id = self._id_of(saved, "TicketId", "SaveTicketEntity")
            await progress.done("ticket", id=ticket_id, person=person_id)
            log.info(
                "ticket_created",
                extra={
                    "fields": {
                        "backend": self.name,
                        "ticket": ticket_id,
                        "person": person_id if person_id is not None else "-",
                    }
                },
            )
        notify = bool(fields.get("notify", self.cfg.notify))
        await self._post_message(ticket_id, mail, progress, person_id, notify, automatic=False)
        return TicketRef(self.name, SYSTEM, ticket_id, ticket_id)

    async def add_message(
        self, ref: TicketRef, mail: ParsedMail, progress: Progress, *, automatic: bool = False
    ) -> None:
        mail = reply_view(mail, self.cfg.quoted, followup=True)
        ticket_id = self._check_id(ref.id)
        person_id = None
        if "message" not in progress.data:
            person_id = await self._person_for("lookup", mail, fallback=False)
        await self._post_message(ticket_id, mail, progress, person_id, self.cfg.notify, automatic)

    async def ticket_status(self, ref: TicketRef) -> str | None:
        ticket_id = self._check_id(ref.id)
        entity = await self._call("GetTicketEntity", params={"ticketEntityId": ticket_id})
        if not isinstance(entity, dict) or not entity.get("TicketId"):
            # The agent answers an empty entity (or null) for an id it does not have.
            raise PermanentError(f"{self.name}: ticket {ticket_id} does not exist")
        status = str(entity.get("BaseStatus") or "").lower()
        if status in ("closed", "deleted", "merged"):
            return "closed"
        if status in ("active", "postponed"):
            return "open"
        return None

    async def possible_first(self, ref: TicketRef, mail: ParsedMail) -> str | None:
        """See `Backend`. Searchable: `find_existing` answers instead."""
        return None

    async def find_existing(self, decision: Decision, mail: ParsedMail) -> TicketRef | None:
        """The newest ticket with this mail's title (and person) made in the look-back window."""
        person_id = await self._person_for(decision.ticket.get("person", "lookup"), mail)
        title = _title(mail)
        since = datetime.now(UTC) - timedelta(seconds=self.cfg.find_window_seconds)
        terms = [
            f"title eq {_odata_string(title)}",
            f"createdAt after '{since.strftime('%Y-%m-%dT%H:%M:%S')}'",
        ]
        if person_id is not None:
            terms.append(f"personId eq {person_id}")
        params = {
            "$select": "ticketId,title,createdAt",
            "$filter": " and ".join(terms),
            "$orderBy": "createdAt desc",
            "$top": "5",
        }
        reply = await self._call(
            "TicketArchive", params=params, method="GET", path="/Ticket", entity_call=False
        )
        rows = reply.get("value") if isinstance(reply, dict) else None
        for row in rows or []:
            if isinstance(row, dict) and row.get("title") == title and row.get("ticketId"):
                tid = str(row["ticketId"])
                log.info("ticket_found", extra={"fields": {"backend": self.name, "ticket": tid}})
                return TicketRef(self.name, SYSTEM, tid, tid)
        return None

    async def aclose(self) -> None:
        await self._http.aclose()

    # ------------------------------------------------------------------------------ tickets

    def _fill_ticket(
        self, entity: dict[str, Any], fields: dict[str, Any], mail: ParsedMail, person: int | None
    ) -> None:
        entity["TicketId"] = 0
        entity["Title"] = _title(mail)
        category = fields.get("category", self.cfg.default_category)
        if category is not None:
            entity["Category"] = {"TicketCategoryId": int(category)}
        priority = fields.get("priority", self.cfg.default_priority)
        if priority is not None:
            entity["Priority"] = {"TicketPriorityId": int(priority)}
        slevel = fields.get("slevel", self.cfg.default_slevel)
        if slevel is not None:
            entity["Slevel"] = _SLEVELS[str(slevel).lower()]
        if person is not None:
            entity["Person"] = {"PersonId": person}
        if mail.from_addr:
            entity["FromAddress"] = mail.from_addr

    async def _post_message(
        self,
        ticket_id: str,
        mail: ParsedMail,
        progress: Progress,
        person: int | None,
        notify: bool,
        automatic: bool,
    ) -> None:
        cfg = self.cfg
        keep, skipped = select_attachments(
            mail,
            max_bytes=cfg.max_attachment_bytes,
            max_total=cfg.max_total_attachment_bytes,
            blocked_extensions=cfg.blocked_extensions,
        )
        html = ""
        if mail.html and len(mail.html) <= cfg.max_body_chars:
            html = _html_with_header(mail, cfg.header_fields)
        uploaded = progress.data.get("attachments")
        att_ids: list[int] = list(uploaded["ids"]) if uploaded else []
        message = progress.data.get("message")
        if message is None:
            if keep and uploaded is None:
                await progress.begin("attachments")
                # inline images are shown inside the HTML body (by ContentId) when it goes
                att_ids = [await self._upload(att, inline=bool(html)) for att in keep]
                await progress.done("attachments", ids=att_ids)
            entity = await self._call("CreateDefaultTicketMessageEntity", entity_call=False)
            if not isinstance(entity, dict):
                raise TransientError(
                    f"{self.name}: CreateDefaultTicketMessageEntity: no entity returned"
                )
            entity["EjMessageId"] = 0
            entity["Ticket"] = {"TicketId": int(ticket_id)}
            entity["Body"] = ticket_text(
                mail,
                header_fields=cfg.header_fields,
                max_chars=cfg.max_body_chars,
                not_forwarded=skipped,
                automatic=automatic,
            )
            if html:
                entity["HtmlBody"] = html
                entity["Type"] = "Html"
            entity["Author"] = mail.from_addr
            if mail.message_id:
                entity["MessageId"] = mail.message_id
            entity["Slevel"] = "External"
            if person is not None:
                entity["Person"] = {"PersonId": person}
            await progress.begin("message")
            if notify:
                saved = await self._call(
                    "SaveTicketMessageEntityWithNotify", json={"NewEntity": entity, "Notify": True}
                )
            else:
                saved = await self._call("SaveTicketMessageEntity", json=entity)
            message_id = self._id_of(saved, "EjMessageId", "SaveTicketMessageEntity")
            await progress.done("message", id=message_id)
            log.info(
                "message_added",
                extra={
                    "fields": {
                        "backend": self.name,
                        "ticket": ticket_id,
                        "message": message_id,
                        "attachments": len(att_ids),
                        "skipped": len(skipped),
                    }
                },
            )
        else:
            message_id = str(message["id"])
        if att_ids:
            # Connecting the same attachments again is harmless, so this step needs no record.
            await self._call(
                "AddAttachments",
                json={"TicketMessageEntityId": int(message_id), "AttachmentIds": att_ids},
            )

    async def _upload(self, att: Attachment, *, inline: bool) -> int:
        entity: dict[str, Any] = {
            "AttachmentId": 0,
            "Name": att.filename or "attachment",
            "ContentType": att.content_type or "application/octet-stream",
            "AttSize": att.size,
            "InlineImage": False,
        }
        if inline and att.inline and att.content_id:
            entity.update(InlineImage=True, ContentId=att.content_id)
        saved = await self._call("SaveAttachmentEntity", json=entity, entity_call=False)
        att_id = int(self._id_of(saved, "AttachmentId", "SaveAttachmentEntity"))
        # {"AttachmentId": N, "Content": "<base64>"}, the base64 made piece by piece as it is
        # sent: the attachment is never held encoded (nor inside a JSON string)
        head = b'{"AttachmentId": %d, "Content": "' % att_id
        await self._call(
            "UploadAttachment",
            body=lambda: (
                _base64_json(head, att.data, b'"}'),
                len(head) + 4 * ((len(att.data) + 2) // 3) + 2,
            ),
        )
        return att_id

    # ------------------------------------------------------------------------------ persons

    async def _person_for(
        self, spec: Any, mail: ParsedMail, *, fallback: bool = True
    ) -> int | None:
        """PersonId for the ticket: an id from the rule, or the sender looked up by e-mail."""
        default = self.cfg.default_person if fallback else None
        if spec is not None and spec != "lookup":
            if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
                raise PermanentError(f'{self.name}: person must be "lookup" or a PersonId')
            return spec
        email = mail.from_addr.strip().lower()
        if not email:
            return default
        cached = self._persons.get(email)
        now = time.monotonic()
        if cached is not None and cached[1] > now:
            return cached[0] if cached[0] is not None else default
        params = {
            "$select": "personId",
            "$filter": f"personEmail/emailAddress eq {_odata_string(email)}",
            "$orderBy": "personId",
            "$top": "1",
        }
        reply = await self._call(
            "PersonArchive", params=params, method="GET", path="/Person", entity_call=False
        )
        rows = reply.get("value") if isinstance(reply, dict) else None
        found: int | None = None
        if rows and isinstance(rows[0], dict):
            raw = rows[0].get("personId", rows[0].get("PrimaryKey"))
            try:
                found = int(raw) if raw else None
            except (TypeError, ValueError):
                found = None
        ttl = self.cfg.person_cache_seconds if found is not None else NEGATIVE_CACHE_SECONDS
        self._persons[email] = (found, now + min(ttl, self.cfg.person_cache_seconds))
        log.debug(
            "person_lookup", extra={"fields": {"backend": self.name, "found": found is not None}}
        )
        return found if found is not None else default

    # -------------------------------------------------------------------------------- HTTP

    async def _call(
        self,
        op: str,
        *,
        json: Any = None,
        params: dict[str, Any] | None = None,
        method: str = "POST",
        path: str | None = None,
        entity_call: bool = True,
        body: Callable[[], tuple[AsyncIterator[bytes], int]] | None = None,
    ) -> Any:
        """One WebAPI call with auth, the concurrency limit, one renewal on 401, error mapping.

        `entity_call`: a 404 means "no such entity" (PermanentError); otherwise the endpoint
        itself is missing, i.e. the configured URL is wrong (BackendUnavailable).
        """
        url = self._api + (path if path is not None else f"/Agents/Ticket/{op}")
        for attempt in (1, 2):
            async with self._sem:
                # Headers are taken once a slot is free, and a refused call renews while it still
                # holds its slot: calls queued behind it go out with the new credential.
                headers = await self._auth_headers()
                started = time.monotonic()
                try:
                    if body is not None:  # a JSON body streamed with its length (new per try)
                        stream, length = body()
                        sized = {
                            **headers,
                            "Content-Type": "application/json",
                            "Content-Length": str(length),
                        }
                        resp = await self._http.request(
                            method, url, content=stream, params=params, headers=sized
                        )
                    else:
                        resp = await self._http.request(
                            method, url, json=json, params=params, headers=headers
                        )
                except (httpx.HTTPError, httpx.InvalidURL) as exc:
                    error = type(exc).__name__
                    log.warning(
                        "call_failed",
                        extra={"fields": {"backend": self.name, "op": op, "error": error}},
                    )
                    raise transport_error(f"{self.name}: {op}", exc) from exc
                status = resp.status_code
                log.debug(
                    "call",
                    extra={
                        "fields": {
                            "backend": self.name,
                            "op": op,
                            "status": status,
                            "ms": int((time.monotonic() - started) * 1000),
                        }
                    },
                )
                renewed = status == 401 and attempt == 1 and await self._renew(headers)
            if renewed:
                continue
            if 200 <= status < 300:
                if status == 204 or not resp.content:
                    return None
                try:
                    return resp.json()
                except ValueError as exc:
                    raise TransientError(f"{self.name}: {op}: HTTP {status} but not JSON") from exc
            raise self._error(op, resp, entity_call)
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, op: str, resp: httpx.Response, entity_call: bool) -> BackendError:
        status = resp.status_code
        message = self._server_message(resp)
        if status == 404 and entity_call:  # the WebAPI's "no such entity"
            return PermanentError(f"{self.name}: {op}: HTTP 404: {message}")
        err = status_error(f"{self.name}: {op}", status, resp.headers)
        if status in (401, 403):
            log.error(
                "auth_refused", extra={"fields": {"backend": self.name, "op": op, "status": status}}
            )
        return type(err)(f"{err}: {message}", retry_after=err.retry_after)

    def _server_message(self, resp: httpx.Response) -> str:
        try:
            body = resp.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            for key in self.cfg.error_fields:
                value = body.get(key)
                if isinstance(value, str) and value.strip():
                    return value.strip()[:MAX_ERROR_CHARS]
        raw = " ".join(resp.text.split())
        return raw[:MAX_ERROR_CHARS] or resp.reason_phrase or "(no message)"

    # -------------------------------------------------------------------------- credentials

    def _headers_now(self) -> dict[str, str]:
        """The auth headers from the credentials as they are now (renews nothing)."""
        cfg = self.cfg
        headers: dict[str, str] = {}
        if self._app_token.value is not None:
            headers["SO-AppToken"] = self._app_token.value
        if cfg.auth == "basic":
            assert self._password is not None
            raw = f"{cfg.username}:{self._password.value or ''}".encode()
            headers["Authorization"] = "Basic " + base64.b64encode(raw).decode("ascii")
        elif cfg.auth == "soticket":
            assert self._ticket is not None
            headers["Authorization"] = f"SOTicket {self._ticket.value or ''}"
        else:
            assert self._token is not None
            headers["Authorization"] = f"Bearer {self._token.value or ''}"
        return headers

    def _token_stale(self) -> bool:
        """A bearer token that is missing or past its announced lifetime."""
        if self._token is None:
            return False
        expired = self._expires_at is not None and time.monotonic() >= self._expires_at
        return self._token.value is None or expired

    async def _auth_headers(self) -> dict[str, str]:
        if self._token_stale():
            await self._renew(None)
        return self._headers_now()

    def _can_refresh(self) -> bool:
        rt = self._refresh_token
        return rt is not None and (rt.value is not None or rt.rereadable)

    async def _renew(self, used: dict[str, str] | None) -> bool:
        """Get a fresh credential: after a 401 (`used` = the refused headers) or, with `used`
        None, before a bearer call whose token is missing or expired.

        Returns True when the next attempt should use a different credential. Concurrent callers
        that saw the same refusal renew once: the later ones find the credential already changed.
        """
        async with self._auth_lock:
            if used is not None and self._headers_now() != used:
                return True
            if used is None and not self._token_stale():
                return True
            if self._can_refresh():
                await self._oauth_refresh()
                return True
            changed = False
            for secret in (self._password, self._ticket, self._token, self._app_token):
                if secret is not None and secret.reread():
                    changed = True
            if changed:
                log.info("credential_reread", extra={"fields": {"backend": self.name}})
            elif self._token is not None and self._token.value is None:
                raise BackendUnavailable(f"{self.name}: no bearer token and no way to get one")
            return changed

    async def _oauth_refresh(self) -> None:
        cfg = self.cfg
        assert self._refresh_token is not None and self._token is not None
        assert cfg.token_url is not None
        self._refresh_token.reread()
        self._app_token.reread()
        form = {
            "grant_type": "refresh_token",
            "client_id": cfg.client_id or "",
            "client_secret": self._app_token.value or "",
            "refresh_token": self._refresh_token.value or "",
        }
        try:
            # Not under the call semaphore: the token endpoint is the login service, and a caller
            # holding a slot may be the one waiting for this refresh.
            resp = await self._http.post(cfg.token_url, data=form)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise transport_error(f"{self.name}: token refresh", exc) from exc
        status = resp.status_code
        if status == 200:
            try:
                body = resp.json()
            except ValueError:
                body = None
            token = body.get("access_token") if isinstance(body, dict) else None
            if not isinstance(token, str) or not token:
                raise BackendUnavailable(f"{self.name}: token refresh: no access_token in reply")
            self._token.value = token
            expires_in: Any = body.get("expires_in") if isinstance(body, dict) else None
            try:
                # Renew a little early so a call never starts with a token about to run out.
                self._expires_at = time.monotonic() + max(0.0, float(expires_in) - 30.0)
            except (TypeError, ValueError):
                self._expires_at = None
            log.info("token_refreshed", extra={"fields": {"backend": self.name}})
            return
        message = self._server_message(resp)
        err = status_error(f"{self.name}: token refresh", status, resp.headers)
        if isinstance(err, TransientError):
            raise TransientError(f"{err}: {message}", retry_after=err.retry_after)
        log.error(
            "token_refresh_refused", extra={"fields": {"backend": self.name, "status": status}}
        )
        raise BackendUnavailable(f"{self.name}: token refresh: HTTP {status}: {message}")

    # -------------------------------------------------------------------------------- misc

    def _check_id(self, ticket_id: str) -> str:
        if not str(ticket_id).strip().isdigit():
            raise PermanentError(f"{self.name}: {ticket_id!r} is not a WebAPI TicketId")
        return str(int(ticket_id))

    def _id_of(self, saved: Any, key: str, op: str) -> str:
        value = saved.get(key) if isinstance(saved, dict) else None
        if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
            raise TransientError(f"{self.name}: {op}: reply has no {key}")
        if int(value) <= 0:
            raise TransientError(f"{self.name}: {op}: reply has no {key}")
        return str(int(value))
