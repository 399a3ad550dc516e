"""SuperOffice WebAPI (REST) simulator: tickets ("requests"), messages, attachments, persons.

Owns everything under `/superoffice/api/v1/...` and the two login-service endpoints under
`/superoffice/login/...`, following shared/contracts/superoffice-rest.md:

* Agent calls are `POST /api/v1/Agents/Ticket/<Method>`, scalars in the query string, entities as
  the JSON body, PascalCase property names: CreateDefaultTicketEntity, SaveTicketEntity,
  CreateDefaultTicketMessageEntity, SaveTicketMessageEntity, SaveTicketMessageEntityWithNotify
  (`{NewEntity, Notify}`), GetTicketEntity (`?ticketEntityId=`), GetTicket (`?ticketId=`),
  SaveAttachmentEntity, UploadAttachment (`{AttachmentId, Content}`, Content in base64) and
  AddAttachments (`{TicketMessageEntityId, AttachmentIds}`).
* RESTful reads: `GET /api/v1/Ticket/{id}` (TicketEntity), and the OData archive lists
  `GET /api/v1/Person` and `GET /api/v1/Ticket` with `$select`, `$filter`, `$orderBy`, `$top`
  (e.g. `$filter=personEmail/emailAddress eq 'a@b.example'`); rows are `{PrimaryKey, EntityName,
  <selected columns>}` inside `{"odata.metadata", "value": [...]}`.
* Authentication (one of): `Basic` ACCOUNT_EMAIL/PASSWORD (an onsite installation);
  `SOTicket <ticket>` plus `SO-AppToken` (online); `Bearer <access token>` (online; SO-AppToken
  optional, checked when sent). Anything else is 401 with a JSON error body.
* Expiry: SOTickets and access tokens belong to the `session_epoch` in which they were issued.
  The demo values (DEMO_SOTICKET, DEMO_TOKEN) were issued in epoch 0, so after
  `POST /_sim/sessions/expire` they are refused with 401 and a client must get a new one:
  - Bearer: OAuth 2.0 refresh grant at `POST /superoffice/login/common/oauth/tokens` (form
    fields grant_type=refresh_token, client_id, client_secret = the app token, refresh_token);
    answers `{token_type, access_token, expires_in}`. This is SuperOffice Online's token
    endpoint (SuperID); the contract itself documents no refresh.
  - SOTicket: `POST /superoffice/login/api/PartnerSystemUser/Authenticate` with
    `{SignedSystemToken, ApplicationToken, ContextIdentifier, ReturnTokenType: "Text"}` answers
    `{IsSuccessful, ErrorMessage, Token}`. SIMPLIFICATION: the real service needs the system user
    token signed with the application's RSA key; this one accepts any SignedSystemToken that
    starts with DEMO_SYSTEM_USER_TOKEN and supports only ReturnTokenType "Text".
* Errors: the contract does not know the WebAPI's error body, so this one answers
  `{"Error": <message>, "ErrorType": <kind>}`: 400 for bad input (unknown category, priority,
  person, slevel, missing title...), 404 for an unknown ticket/message, 401 for credentials,
  503 with Retry-After for a temporary failure.
* Faults (`state.gate`): "error" → 503 + Retry-After: 1; "reject" → 400 with the error body;
  "auth" → 401 (the token endpoints answer 401 invalid_client).

Tickets are stored as `SimTicket(system="superoffice-rest")` with `id == ref == str(TicketId)`,
`requester` = the person's e-mail (or the ticket's FromAddress when it has no person), and
`fields` under the WebAPI's names: Category, Priority, Slevel, Person, FromAddress, Notify.
Persons are BUILTIN_PERSONS plus the WebAPI persons added with `POST /_sim/clients`.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway.simulators.state import ACCOUNT_EMAIL, PASSWORD, SimMessage, SimState, SimTicket

SYSTEM = "superoffice-rest"
API = "/superoffice/api/v1"
LOGIN = "/superoffice/login"

# Demo credentials; config.example.toml uses the same ones.
DEMO_APP_TOKEN = "demo-apptoken"  # SO-AppToken, also the OAuth client_secret
DEMO_SOTICKET = "demo-soticket"  # valid until the first /_sim/sessions/expire
DEMO_TOKEN = "demo-token"  # Bearer access token, valid until the first /_sim/sessions/expire
DEMO_CLIENT_ID = "demo-client"
DEMO_REFRESH_TOKEN = "demo-refresh-token"
DEMO_SYSTEM_USER_TOKEN = "demo-system-user-token"
CONTEXT_ID = "Cust12345"
TOKEN_LIFETIME = 3600  # seconds, announced as expires_in (expiry itself is by session_epoch)

CATEGORIES = {1: "Support", 2: "Sales", 3: "Billing", 4: "Hosting"}
PRIORITIES = {1: "Low", 2: "Medium", 3: "High", 4: "Critical"}
DEFAULT_CATEGORY = 1
DEFAULT_PRIORITY = 2
SLEVELS = {"external": "External", "internal": "Internal"}
DEFAULT_PERSON_ID = 1
BUILTIN_PERSONS: dict[int, dict[str, str]] = {
    DEFAULT_PERSON_ID: {"email": ACCOUNT_EMAIL, "name": "E-mail gateway (unknown senders)"},
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SoError(Exception):
    """Raised inside a handler; becomes the WebAPI's JSON error answer."""

    def __init__(self, status: int, message: str, kind: str = "SoException") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _error(status: int, message: str, kind: str = "SoException", **headers: str) -> web.Response:
    return web.json_response({"Error": message, "ErrorType": kind}, status=status, headers=headers)


def _unauthorized(message: str) -> web.Response:
    return _error(
        401,
        message,
        "Unauthorized",
        **{"WWW-Authenticate": 'Basic realm="SuperOffice", SOTicket, Bearer'},
    )


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise SoError(400, f"{what} must be an integer", "ArgumentException")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SoError(400, f"{what} must be an integer", "ArgumentException") from None


class _Store:
    """What the WebAPI knows beyond SimTicket: message ids, attachments, issued credentials.

    `SimState.reset()` replaces `state.tickets`; the store notices and starts over with it.
    """

    def __init__(self, state: SimState) -> None:
        self.state = state
        self._bind()

    def _bind(self) -> None:
        self.tickets_ref = self.state.tickets
        self.messages: dict[int, tuple[str, SimMessage]] = {}  # EjMessageId -> (ticket id, msg)
        self.links: dict[int, set[int]] = {}  # EjMessageId -> attachment ids linked
        self.attachments: dict[int, dict[str, Any]] = {}
        self.issued: dict[str, tuple[str, int]] = {}  # credential -> (kind, session epoch)
        self._msg_ids = itertools.count(5001)
        self._att_ids = itertools.count(9001)

    def fresh(self) -> _Store:
        if self.tickets_ref is not self.state.tickets:
            self._bind()
        return self

    def next_message_id(self) -> int:
        return next(self._msg_ids)

    def next_attachment_id(self) -> int:
        return next(self._att_ids)

    def issue(self, kind: str) -> str:
        epoch = self.state.session_epoch
        if kind == "soticket":
            value = f"7T:sim{epoch}.{secrets.token_hex(12)}"
        else:
            value = f"8A:{CONTEXT_ID}.sim{epoch}.{secrets.token_hex(16)}"
        self.issued[value] = (kind, epoch)
        return value

    def credential_valid(self, kind: str, value: str) -> bool:
        demo = {"soticket": DEMO_SOTICKET, "bearer": DEMO_TOKEN}[kind]
        if value == demo:
            return self.state.session_epoch == 0
        issued = self.issued.get(value)
        return issued is not None and issued == (kind, self.state.session_epoch)

    def persons(self) -> dict[int, dict[str, str]]:
        people = dict(BUILTIN_PERSONS)
        for c in self.state.clients:
            if c.get("system") != SYSTEM:
                continue
            try:
                pid = int(c["id"])
            except (TypeError, ValueError):
                continue  # a WebAPI person id is an int32; others cannot be addressed
            people[pid] = {"email": str(c["email"]), "name": str(c.get("name") or c["email"])}
        return people

    def ticket(self, ticket_id: int) -> SimTicket:
        t = self.state.find(SYSTEM, str(ticket_id))
        if t is None:
            raise SoError(404, f"Ticket {ticket_id} not found", "NotFound")
        return t

    def ticket_messages(self, ticket_id: str) -> list[tuple[int, SimMessage]]:
        return [(mid, m) for mid, (tid, m) in self.messages.items() if tid == ticket_id]


# --------------------------------------------------------------------------------- entities


def _person_carrier(pid: int, person: dict[str, str]) -> dict[str, Any]:
    return {"PersonId": pid, "FullName": person["name"], "Email": person["email"]}


def _ticket_entity(store: _Store, t: SimTicket) -> dict[str, Any]:
    f = t.fields
    cat, pri, pid = f.get("Category"), f.get("Priority"), f.get("Person")
    persons = store.persons()
    msgs = store.ticket_messages(t.id)
    return {
        "TicketId": int(t.id) if t.id.isdigit() else 0,
        "Title": t.title,
        "CreatedAt": _iso(t.created_at),
        "Author": t.messages[0].author if t.messages else t.requester,
        "OwnedBy": None,
        "Category": {"TicketCategoryId": cat, "Name": CATEGORIES.get(cat, "")} if cat else None,
        "Slevel": f.get("Slevel", "External"),
        "Priority": {"TicketPriorityId": pri, "Name": PRIORITIES.get(pri, "")} if pri else None,
        "BaseStatus": t.status.capitalize() if t.status != "open" else "Active",
        "Status": None,
        "Origin": "Internal",
        "Person": _person_carrier(pid, persons[pid]) if pid in persons else None,
        "SecondaryPersons": [],
        "FromAddress": f.get("FromAddress", ""),
        "NumMessages": len(t.messages),
        "HasAttachment": any(m.attachments for m in t.messages),
        "Messages": [
            {"TicketMessageId": mid, "Slevel": "External", "Important": False} for mid, _ in msgs
        ],
        "Tags": [],
        "CustomFields": {},
        "ExtraFields": {},
    }


def _ticket_carrier(store: _Store, t: SimTicket) -> dict[str, Any]:
    """The flat `Ticket` carrier of Agents/Ticket/GetTicket."""
    e = _ticket_entity(store, t)
    cat, pri = t.fields.get("Category") or 0, t.fields.get("Priority") or 0
    return {
        "TicketId": e["TicketId"],
        "Title": e["Title"],
        "Category": cat,
        "CategoryName": CATEGORIES.get(cat, ""),
        "Priority": pri,
        "PriorityName": PRIORITIES.get(pri, ""),
        "BaseStatus": e["BaseStatus"],
        "Slevel": e["Slevel"],
        "CustId": t.fields.get("Person") or 0,
        "NumMessages": e["NumMessages"],
        "CreatedAt": e["CreatedAt"],
    }


def _default_ticket_entity() -> dict[str, Any]:
    return {
        "TicketId": 0,
        "Title": "",
        "CreatedAt": None,
        "Author": "",
        "OwnedBy": {"AssociateId": 2147483647},  # auto-assign by category rules
        "Category": {"TicketCategoryId": DEFAULT_CATEGORY, "Name": CATEGORIES[DEFAULT_CATEGORY]},
        "Slevel": "External",
        "Priority": {"TicketPriorityId": DEFAULT_PRIORITY, "Name": PRIORITIES[DEFAULT_PRIORITY]},
        "BaseStatus": "Active",
        "Status": None,
        "Origin": "Internal",
        "Person": None,
        "SecondaryPersons": [],
        "FromAddress": "",
        "Messages": [],
        "Tags": [],
        "CustomFields": {},
        "ExtraFields": {},
    }


def _default_message_entity() -> dict[str, Any]:
    return {
        "EjMessageId": 0,
        "Ticket": None,
        "CreatedAt": None,
        "CreatedBy": None,
        "Author": "",
        "Slevel": "External",
        "Type": "Text",
        "MessageId": "",
        "TimeSpent": 0,
        "Body": "",
        "HtmlBody": "",
        "EmailHeader": "",
        "MessageCategory": "",
        "Person": None,
        "SearchTitle": "",
        "MessageHeaders": [],
        "Important": False,
        "AttachmentsInfo": [],
        "CustomFields": {},
        "ExtraFields": {},
    }


def _ref_id(value: Any, key: str, what: str) -> int | None:
    """The id inside a reference carrier like {"TicketCategoryId": 3}; None when absent/0."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise SoError(400, f"{what} must be an object with {key}", "ArgumentException")
    raw = value.get(key)
    if raw in (None, 0, "0", ""):
        return None
    return _as_int(raw, f"{what}.{key}")


def _entity_body(body: Any, what: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise SoError(400, f"The request body must be a {what}", "ArgumentException")
    return body


# ------------------------------------------------------------------------------ agent calls


def _save_ticket(store: _Store, entity: dict[str, Any]) -> dict[str, Any]:
    title = entity.get("Title")
    if not isinstance(title, str) or not title.strip():
        raise SoError(400, "Title is required", "ValidationException")
    fields: dict[str, Any] = {}
    cat = _ref_id(entity.get("Category"), "TicketCategoryId", "Category")
    if cat is None:
        raise SoError(400, "Category is required", "ValidationException")
    if cat not in CATEGORIES:
        raise SoError(400, f"Unknown category {cat}", "ValidationException")
    fields["Category"] = cat
    pri = _ref_id(entity.get("Priority"), "TicketPriorityId", "Priority")
    if pri is not None:
        if pri not in PRIORITIES:
            raise SoError(400, f"Unknown priority {pri}", "ValidationException")
        fields["Priority"] = pri
    slevel = entity.get("Slevel") or "External"
    if not isinstance(slevel, str) or slevel.lower() not in SLEVELS:
        raise SoError(400, f"Unknown Slevel {slevel!r}", "ValidationException")
    fields["Slevel"] = SLEVELS[slevel.lower()]
    persons = store.persons()
    pid = _ref_id(entity.get("Person"), "PersonId", "Person")
    if pid is not None:
        if pid not in persons:
            raise SoError(400, f"Unknown person {pid}", "ValidationException")
        fields["Person"] = pid
    from_address = str(entity.get("FromAddress") or "")
    if from_address:
        fields["FromAddress"] = from_address
    requester = persons[pid]["email"] if pid is not None else from_address

    tid = entity.get("TicketId")
    if tid in (None, 0, "0", ""):
        t = store.state.add_ticket(
            SimTicket(
                system=SYSTEM,
                id="",
                ref="",
                title=title.strip(),
                requester=requester,
                fields=fields,
            )
        )
        t.id = t.ref = str(store.state.next_id(SYSTEM))
    else:
        t = store.ticket(_as_int(tid, "TicketId"))
        keep = {k: v for k, v in t.fields.items() if k == "Notify"}
        t.title, t.requester, t.fields = title.strip(), requester, {**fields, **keep}
        status = str(entity.get("BaseStatus") or "")
        if status:
            t.status = "open" if status.lower() == "active" else status.lower()
    return _ticket_entity(store, t)


def _save_message(store: _Store, entity: dict[str, Any], notify: bool) -> dict[str, Any]:
    tid = _ref_id(entity.get("Ticket"), "TicketId", "Ticket")
    if tid is None:
        raise SoError(400, "Ticket.TicketId is required", "ValidationException")
    t = store.ticket(tid)
    mid_raw = entity.get("EjMessageId")
    if mid_raw not in (None, 0, "0", ""):
        raise SoError(400, "Updating a message is not supported here", "NotSupportedException")
    body = entity.get("Body") or ""
    html = entity.get("HtmlBody") or ""
    if not isinstance(body, str) or not isinstance(html, str):
        raise SoError(400, "Body and HtmlBody must be strings", "ArgumentException")
    if not body.strip() and not html.strip():
        raise SoError(400, "The message has no Body and no HtmlBody", "ValidationException")
    slevel = entity.get("Slevel") or "External"
    if not isinstance(slevel, str) or slevel.lower() not in SLEVELS:
        raise SoError(400, f"Unknown Slevel {slevel!r}", "ValidationException")
    persons = store.persons()
    pid = _ref_id(entity.get("Person"), "PersonId", "Person")
    if pid is not None and pid not in persons:
        raise SoError(400, f"Unknown person {pid}", "ValidationException")
    att_ids: list[int] = []
    for info in entity.get("AttachmentsInfo") or []:
        aid = _ref_id(info, "AttachmentId", "AttachmentsInfo[]")
        if aid is not None:
            att_ids.append(aid)
    _check_attachments(store, att_ids)
    author = str(entity.get("Author") or (persons[pid]["email"] if pid is not None else ""))
    msg_type = entity.get("Type") or ("Html" if html.strip() else "Text")
    if not isinstance(msg_type, str) or msg_type.lower() not in ("text", "html"):
        raise SoError(400, f"Unknown message Type {msg_type!r}", "ValidationException")
    # what the message carried besides its text: its Type, and which files are inline images
    msg = SimMessage(body=body, author=author, html=html, fields={"Type": msg_type})
    t.messages.append(msg)
    t.fields["Notify"] = notify
    mid = store.next_message_id()
    store.messages[mid] = (t.id, msg)
    store.links[mid] = set()
    _link(store, mid, att_ids)
    saved = {**_default_message_entity(), **entity}
    saved.update(
        EjMessageId=mid,
        Ticket={"TicketId": tid, "Title": t.title},
        CreatedAt=_iso(time.time()),
        Author=author,
        Slevel=SLEVELS[slevel.lower()],
        AttachmentsInfo=[_attachment_info(store, a) for a in sorted(store.links[mid])],
    )
    return saved


def _attachment_info(store: _Store, aid: int) -> dict[str, Any]:
    a = store.attachments[aid]
    keys = ("AttachmentId", "Name", "ContentType", "AttSize", "InlineImage", "ContentId")
    return {k: a[k] for k in keys}


def _check_attachments(store: _Store, ids: list[int]) -> None:
    for aid in ids:
        a = store.attachments.get(aid)
        if a is None:
            raise SoError(400, f"Unknown attachment {aid}", "ValidationException")
        if a.get("content") is None:
            raise SoError(400, f"Attachment {aid} has no uploaded content", "ValidationException")


def _link(store: _Store, mid: int, ids: list[int]) -> None:
    _, msg = store.messages[mid]
    for aid in ids:
        if aid not in store.links[mid]:
            store.links[mid].add(aid)
            att = store.attachments[aid]
            msg.attachments.append(str(att["Name"]))
            if att["InlineImage"]:
                msg.fields.setdefault("InlineImages", {})[str(att["Name"])] = att["ContentId"]


async def _agent_ticket(store: _Store, request: web.Request) -> web.Response:
    method = request.match_info["method"]
    q = request.query

    async def body() -> Any:
        if not request.can_read_body:
            return None
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise SoError(400, f"The request body is not JSON: {exc}", "ArgumentException") from exc

    if method == "CreateDefaultTicketEntity":
        return web.json_response(_default_ticket_entity())
    if method == "CreateDefaultTicketMessageEntity":
        return web.json_response(_default_message_entity())
    if method == "CreateDefaultAttachmentEntity":
        return web.json_response(
            {
                "AttachmentId": 0,
                "Name": "",
                "ContentType": "",
                "AttSize": 0,
                "InlineImage": False,
                "ContentId": "",
            }
        )
    if method == "SaveTicketEntity":
        return web.json_response(_save_ticket(store, _entity_body(await body(), "TicketEntity")))
    if method == "SaveTicketMessageEntity":
        entity = _entity_body(await body(), "TicketMessageEntity")
        return web.json_response(_save_message(store, entity, notify=False))
    if method == "SaveTicketMessageEntityWithNotify":
        req = _entity_body(await body(), "request {NewEntity, Notify}")
        entity = _entity_body(req.get("NewEntity"), "TicketMessageEntity in NewEntity")
        return web.json_response(_save_message(store, entity, notify=bool(req.get("Notify"))))
    if method == "GetTicketEntity":
        tid = _as_int(q.get("ticketEntityId"), "ticketEntityId")
        return web.json_response(_ticket_entity(store, store.ticket(tid)))
    if method == "GetTicket":
        tid = _as_int(q.get("ticketId"), "ticketId")
        return web.json_response(_ticket_carrier(store, store.ticket(tid)))
    if method == "SaveAttachmentEntity":
        entity = _entity_body(await body(), "AttachmentEntity")
        name = entity.get("Name")
        if not isinstance(name, str) or not name.strip():
            raise SoError(400, "Attachment Name is required", "ValidationException")
        aid = store.next_attachment_id()
        store.attachments[aid] = {
            "AttachmentId": aid,
            "Name": name,
            "ContentType": str(entity.get("ContentType") or "application/octet-stream"),
            "AttSize": _as_int(entity.get("AttSize") or 0, "AttSize"),
            "InlineImage": bool(entity.get("InlineImage")),
            "ContentId": str(entity.get("ContentId") or ""),
            "content": None,
        }
        return web.json_response(_attachment_info(store, aid))
    if method == "UploadAttachment":
        req = _entity_body(await body(), "request {AttachmentId, Content}")
        aid = _as_int(req.get("AttachmentId"), "AttachmentId")
        att = store.attachments.get(aid)
        if att is None:
            raise SoError(404, f"Attachment {aid} not found", "NotFound")
        try:
            data = base64.b64decode(str(req.get("Content") or ""), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SoError(400, "Content is not base64", "ArgumentException") from exc
        att["content"] = data
        att["AttSize"] = len(data)
        return web.Response(status=204)
    if method == "AddAttachments":
        req = _entity_body(await body(), "request {TicketMessageEntityId, AttachmentIds}")
        mid = _as_int(req.get("TicketMessageEntityId"), "TicketMessageEntityId")
        if mid not in store.messages:
            raise SoError(404, f"Ticket message {mid} not found", "NotFound")
        raw_ids = req.get("AttachmentIds") or []
        if not isinstance(raw_ids, list):
            raise SoError(400, "AttachmentIds must be an array", "ArgumentException")
        ids = [_as_int(a, "AttachmentIds[]") for a in raw_ids]
        _check_attachments(store, ids)
        _link(store, mid, ids)
        return web.Response(status=204)
    raise SoError(404, f"No such agent method Ticket/{method}", "NotFound")


# --------------------------------------------------------------------------- OData archives

_TERM = re.compile(r"\s*([\w/]+)\s+(\w+)\s+('(?:[^']|'')*'|[^\s']+)\s*(?:$|and\b)", re.IGNORECASE)


def _parse_filter(text: str) -> list[tuple[str, str, str]]:
    """`col op value [and ...]` → [(col, op, value)]; strings in '...' with '' for a quote."""
    terms: list[tuple[str, str, str]] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _TERM.match(text, pos)
        if m is None:
            raise SoError(
                400, f"Cannot parse $filter near {text[pos : pos + 30]!r}", "ArgumentException"
            )
        col, op, raw = m.group(1), m.group(2).lower(), m.group(3)
        value = raw[1:-1].replace("''", "'") if raw.startswith("'") else raw
        terms.append((col, op, value))
        pos = m.end()
    return terms


def _compare(actual: Any, op: str, wanted: str) -> bool:
    if isinstance(actual, int):
        try:
            w: Any = int(wanted)
        except ValueError:
            raise SoError(400, f"{wanted!r} is not an integer", "ArgumentException") from None
    elif isinstance(actual, datetime):
        try:
            w = datetime.fromisoformat(wanted.replace("Z", "+00:00"))
        except ValueError:
            raise SoError(400, f"{wanted!r} is not a date", "ArgumentException") from None
        if w.tzinfo is None:
            w = w.replace(tzinfo=UTC)
    else:
        actual, w = str(actual).lower(), wanted.lower()
    if op in ("eq", "is", "equals", "="):
        return bool(actual == w)
    if op in ("ne", "isnot", "unequals"):
        return bool(actual != w)
    if op in ("gt", "after", "greater"):
        return bool(actual > w)
    if op == "ge":
        return bool(actual >= w)
    if op in ("lt", "before", "less"):
        return bool(actual < w)
    if op == "le":
        return bool(actual <= w)
    if op == "contains" and isinstance(actual, str):
        return w in actual
    if op in ("begins", "startswith") and isinstance(actual, str):
        return actual.startswith(w)
    raise SoError(400, f"Unsupported filter operator {op!r}", "ArgumentException")


def _archive(
    request: web.Request, rows: list[dict[str, Any]], columns: set[str], entity: str
) -> web.Response:
    q = request.query
    for col, op, value in _parse_filter(q.get("$filter", "")):
        if col not in columns:
            raise SoError(400, f"Unknown column {col!r} in $filter", "ArgumentException")
        rows = [r for r in rows if _compare(r[col], op, value)]
    order = q.get("$orderBy") or q.get("$orderby") or ""
    for part in reversed([p.strip() for p in order.split(",") if p.strip()]):
        col, _, direction = part.partition(" ")
        if col not in columns:
            raise SoError(400, f"Unknown column {col!r} in $orderBy", "ArgumentException")
        rows = sorted(rows, key=lambda r: r[col], reverse=direction.strip().lower() == "desc")
    if q.get("$top"):
        rows = rows[: _as_int(q["$top"], "$top")]
    select = [c.strip() for c in q.get("$select", "").split(",") if c.strip()] or sorted(columns)
    for col in select:
        if col not in columns:
            raise SoError(400, f"Unknown column {col!r} in $select", "ArgumentException")
    key = f"{entity}Id"
    found = []
    for r in rows:
        out: dict[str, Any] = {"PrimaryKey": r[key], "EntityName": entity}
        for col in select:
            v = r[col]
            out[col] = _iso(v.timestamp()) if isinstance(v, datetime) else v
        found.append(out)
    return web.json_response({"odata.metadata": f"{API}/archive$metadata", "value": found})


def _person_rows(store: _Store) -> list[dict[str, Any]]:
    return [
        {"personId": pid, "fullName": p["name"], "personEmail/emailAddress": p["email"]}
        for pid, p in sorted(store.persons().items())
    ]


def _ticket_rows(store: _Store) -> list[dict[str, Any]]:
    rows = []
    for t in store.state.tickets:
        if t.system != SYSTEM or not t.id.isdigit():
            continue
        rows.append(
            {
                "ticketId": int(t.id),
                "title": t.title,
                "createdAt": datetime.fromtimestamp(t.created_at, UTC),
                "personId": int(t.fields.get("Person") or 0),
                "categoryId": int(t.fields.get("Category") or 0),
                "ticketStatusName": "Closed" if t.status == "closed" else "Active",
            }
        )
    return rows


# ---------------------------------------------------------------------------------- routes


def add_routes(app: web.Application, state: SimState) -> None:
    """Register the WebAPI and login-service routes on `app` (see the module docstring)."""
    store = _Store(state)

    def check_auth(request: web.Request) -> web.Response | None:
        scheme, _, value = request.headers.get("Authorization", "").partition(" ")
        scheme, value = scheme.lower(), value.strip()
        app_token = request.headers.get("SO-AppToken")
        if scheme == "basic":
            try:
                user, _, password = base64.b64decode(value).decode("utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return _unauthorized("Malformed Basic credentials")
            if user.lower() == ACCOUNT_EMAIL and password == PASSWORD:
                return None
            return _unauthorized("Unknown user name or wrong password")
        if scheme == "soticket":
            if app_token != DEMO_APP_TOKEN:
                return _unauthorized("SOTicket needs a valid SO-AppToken header")
            if store.credential_valid("soticket", value):
                return None
            return _unauthorized("The ticket is invalid or has expired")
        if scheme == "bearer":
            if app_token is not None and app_token != DEMO_APP_TOKEN:
                return _unauthorized("Unknown SO-AppToken")
            if store.credential_valid("bearer", value):
                return None
            return _unauthorized("The access token is invalid or has expired")
        return _unauthorized("Authorization required: Basic, SOTicket or Bearer")

    def endpoint(
        handler: Callable[[_Store, web.Request], Awaitable[web.StreamResponse]],
    ) -> Handler:
        async def wrapped(request: web.Request) -> web.StreamResponse:
            mode = await state.gate(SYSTEM, request)
            if mode == "error":
                return _error(
                    503,
                    "The service is temporarily unavailable",
                    "ServiceUnavailable",
                    **{"Retry-After": "1"},
                )
            if mode == "auth":
                return _unauthorized("Credentials refused (simulated)")
            denied = check_auth(request)
            if denied is not None:
                return denied
            if mode == "reject":
                return _error(400, "Request rejected by the service (simulated)", "SoException")
            try:
                return await handler(store.fresh(), request)
            except SoError as exc:
                return _error(exc.status, exc.message, exc.kind)

        return wrapped

    async def ticket_get(st: _Store, request: web.Request) -> web.Response:
        tid = _as_int(request.match_info["id"], "id")
        return web.json_response(_ticket_entity(st, st.ticket(tid)))

    async def ticket_archive(st: _Store, request: web.Request) -> web.Response:
        return _archive(request, _ticket_rows(st), _TICKET_COLUMNS, "ticket")

    async def person_archive(st: _Store, request: web.Request) -> web.Response:
        return _archive(request, _person_rows(st), _PERSON_COLUMNS, "person")

    async def oauth_tokens(request: web.Request) -> web.Response:
        mode = await state.gate(SYSTEM, request)
        if mode == "error":
            return web.json_response(
                {"error": "temporarily_unavailable"}, status=503, headers={"Retry-After": "1"}
            )
        form = await request.post()
        if (
            mode == "auth"
            or form.get("client_id") != DEMO_CLIENT_ID
            or (form.get("client_secret") != DEMO_APP_TOKEN)
        ):
            return web.json_response({"error": "invalid_client"}, status=401)
        if form.get("grant_type") != "refresh_token":
            return web.json_response({"error": "unsupported_grant_type"}, status=400)
        if form.get("refresh_token") != DEMO_REFRESH_TOKEN:
            return web.json_response({"error": "invalid_grant"}, status=400)
        return web.json_response(
            {
                "token_type": "Bearer",
                "access_token": store.fresh().issue("bearer"),
                "expires_in": TOKEN_LIFETIME,
            }
        )

    async def system_user(request: web.Request) -> web.Response:
        mode = await state.gate(SYSTEM, request)
        if mode == "error":
            return web.json_response(
                {"IsSuccessful": False, "ErrorMessage": "Service unavailable", "Token": None},
                status=503,
                headers={"Retry-After": "1"},
            )
        try:
            req = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            req = None
        if not isinstance(req, dict):
            return web.json_response(
                {"IsSuccessful": False, "ErrorMessage": "Body must be JSON", "Token": None},
                status=400,
            )
        ok = (
            mode != "auth"
            and req.get("ApplicationToken") == DEMO_APP_TOKEN
            and req.get("ContextIdentifier") == CONTEXT_ID
            and str(req.get("SignedSystemToken") or "").startswith(DEMO_SYSTEM_USER_TOKEN)
        )
        if not ok:
            return web.json_response(
                {"IsSuccessful": False, "ErrorMessage": "Authentication failed", "Token": None},
                status=401,
            )
        if str(req.get("ReturnTokenType") or "Text").lower() != "text":
            return web.json_response(
                {"IsSuccessful": False, "ErrorMessage": "Only ReturnTokenType Text", "Token": None},
                status=400,
            )
        ticket = store.fresh().issue("soticket")
        return web.json_response({"IsSuccessful": True, "ErrorMessage": "", "Token": ticket})

    app.router.add_post(f"{API}/Agents/Ticket/{{method}}", endpoint(_agent_ticket))
    app.router.add_get(f"{API}/Ticket/{{id}}", endpoint(ticket_get))
    app.router.add_get(f"{API}/Ticket", endpoint(ticket_archive))
    app.router.add_get(f"{API}/Person", endpoint(person_archive))
    app.router.add_post(f"{LOGIN}/common/oauth/tokens", oauth_tokens)
    app.router.add_post(f"{LOGIN}/api/PartnerSystemUser/Authenticate", system_user)


_TICKET_COLUMNS = {"ticketId", "title", "createdAt", "personId", "categoryId", "ticketStatusName"}
_PERSON_COLUMNS = {"personId", "fullName", "personEmail/emailAddress"}
