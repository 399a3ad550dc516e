"""The WHMCS External API simulator: `POST /whmcs/includes/api.php` (shared/contracts/whmcs.md).

Owns the fake's behaviour for the ticket commands the gateway uses — OpenTicket, AddTicketReply,
GetTicket, GetTickets — and the client look-ups (GetClientsDetails, GetClients), plus WHMCS's way
of signalling errors:

- every answer is JSON `{"result": "success"|"error", ...}`, numbers as JSON strings; command
  errors come with HTTP 200 and the documented `message` strings ("Department ID not found",
  "Ticket ID Not Found", ...);
- credentials (`identifier`/`secret`, the same pair in `username`/`password`, or the legacy admin
  `username` + md5 of the password) and the IP allow-list are checked first; refusals are HTTP 403
  with `Authentication Failed` or `Invalid IP <address>`; a valid `accesskey` bypasses the IP check.

Tickets live in the shared `SimState` with `id` = internal ticket id and `ref` = public `tid`
(`ABC-123456`, never equal to an id). `fields` holds what WHMCS received under its own parameter
names (deptid, priority, customfields decoded from base64 PHP-serialize, serviceid, clientid,
noemail, markdown, name, email). Without `noemail` the simulated WHMCS "sends" its own ticket
confirmation to the requester: it is recorded in the shared outbox like a mail the sink received,
so a test can see a customer getting two acknowledgements.

Faults (`POST /_sim/fault` with system "whmcs"): `error` → HTTP 503 with Retry-After, `reject` →
result=error with the command's business message, `auth` → the authentication failure answer.
`POST /_sim/whmcs/access` sets the IP allow-list and access key (reset by `/_sim/reset`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import logging
import random
import re
import string
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from gateway.simulators.state import PASSWORD, SimMessage, SimState, SimTicket

log = logging.getLogger("gateway.simulators.whmcs")

SYSTEM = "whmcs"
PATH = "/whmcs/includes/api.php"

# Demo credentials; config.example.toml uses the same ones.
IDENTIFIER = "demo-identifier"
SECRET = "demo-secret"
ADMIN_USERNAME = "admin"  # legacy login: username + md5(PASSWORD)
ADMIN_PASSWORD = PASSWORD
ACCESS_KEY = "demo-accesskey"
DEFAULT_ALLOWED_IPS = ("127.0.0.1", "::1")

DEPARTMENTS: dict[str, str] = {"1": "Support", "2": "Billing", "3": "Sales"}
PRIORITIES = ("Low", "Medium", "High")
# SimState keeps statuses lower-case (shared with /_sim/tickets/.../close); WHMCS spells them so:
STATUS_NAMES = {
    "open": "Open",
    "answered": "Answered",
    "customer-reply": "Customer-Reply",
    "closed": "Closed",
    "on hold": "On Hold",
    "in progress": "In Progress",
}
STATUS_KEYS = {name.lower(): key for key, name in STATUS_NAMES.items()}
AWAITING_REPLY = ("Open", "Customer-Reply")
ACTIVE = ("Open", "Answered", "Customer-Reply", "On Hold", "In Progress")

# The business error each command answers while a `reject` fault is active.
REJECT_MESSAGES = {
    "openticket": "Department ID not found",
    "addticketreply": "Ticket ID Not Found",
    "getticket": "Ticket ID Not Found",
    "gettickets": "Department ID not found",
    "getclientsdetails": "Client Not Found",
    "getclients": "Client Not Found",
}

_EMAIL_RE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_TRUE = ("1", "true", "on", "yes")


@dataclass
class Access:
    """IP allow-list and access key of the simulated installation."""

    allowed_ips: set[str] = field(default_factory=lambda: set(DEFAULT_ALLOWED_IPS))
    accesskey: str = ACCESS_KEY
    marker: object = None  # `state.tickets` when set: a `/_sim/reset` replaces it → defaults again


class ApiError(Exception):
    """A WHMCS `result=error` answer with the given message and HTTP status."""

    def __init__(self, message: str, status: int = 200) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


# --- PHP serialize (customfields) --------------------------------------------------------------


class _PhpReader:
    """Reads the subset of PHP `serialize()` output WHMCS custom fields use: arrays of scalars."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _until(self, sep: bytes) -> bytes:
        end = self.data.index(sep, self.pos)
        out = self.data[self.pos : end]
        self.pos = end + len(sep)
        return out

    def _expect(self, token: bytes) -> None:
        if self.data[self.pos : self.pos + len(token)] != token:
            raise ValueError(f"expected {token!r} at {self.pos}")
        self.pos += len(token)

    def value(self) -> Any:
        kind = self.data[self.pos : self.pos + 2]
        self.pos += 2
        if kind == b"N;":
            return None
        if kind == b"i:":
            return int(self._until(b";"))
        if kind == b"d:":
            return float(self._until(b";"))
        if kind == b"b:":
            return self._until(b";") == b"1"
        if kind == b"s:":
            size = int(self._until(b":"))
            self._expect(b'"')
            raw = self.data[self.pos : self.pos + size]
            self.pos += size
            self._expect(b'";')
            return raw.decode("utf-8", errors="replace")
        if kind == b"a:":
            count = int(self._until(b":"))
            self._expect(b"{")
            out: dict[Any, Any] = {}
            for _ in range(count):
                key = self.value()
                out[key] = self.value()
            self._expect(b"}")
            return out
        raise ValueError(f"unsupported PHP type {kind!r}")


def php_unserialize(data: bytes) -> Any:
    """Decode PHP `serialize()` output (null, int, float, bool, string, array)."""
    reader = _PhpReader(data)
    out = reader.value()
    if reader.pos != len(data):
        raise ValueError("trailing data after PHP value")
    return out


def decode_customfields(raw: str) -> dict[str, str]:
    """`customfields` = base64(serialize(array(id => value))) → {"id": "value"}."""
    decoded = php_unserialize(base64.b64decode(raw, validate=True))
    if not isinstance(decoded, dict):
        raise ValueError("customfields is not a serialized array")
    return {str(k): "" if v is None else str(v) for k, v in decoded.items()}


def decode_attachments(raw: str) -> list[dict[str, Any]]:
    """`attachments` = base64(JSON [{name, data: base64}]) → [{name, size, data}]."""
    items = json.loads(base64.b64decode(raw, validate=True))
    if not isinstance(items, list):
        raise ValueError("attachments is not a JSON array")
    out = []
    for item in items:
        if not isinstance(item, dict) or "name" not in item or "data" not in item:
            raise ValueError("each attachment needs name and data")
        data = base64.b64decode(str(item["data"]), validate=True)
        out.append({"name": str(item["name"]), "size": len(data), "data": data})
    return out


# --- helpers ------------------------------------------------------------------------------------


def _flag(form: Mapping[str, str], name: str) -> bool:
    return form.get(name, "").strip().lower() in _TRUE


def _int_param(form: Mapping[str, str], name: str) -> str:
    """The parameter as a canonical decimal string, "" when absent, zero or not a number."""
    value = form.get(name, "").strip()
    return str(int(value)) if value.isdigit() and int(value) > 0 else ""


def _date(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _whmcs_status(ticket: SimTicket) -> str:
    """The WHMCS spelling of a ticket's status; a custom one (e.g. "Resolved") as it was set."""
    return STATUS_NAMES.get(ticket.status.lower(), ticket.status)


def _new_tid(state: SimState) -> str:
    """A public ticket number like `ABC-123456`, unique in the state (WHMCS's ticket mask)."""
    rng = random.SystemRandom()
    while True:
        tid = "".join(rng.choices(string.ascii_uppercase, k=3)) + "-"
        tid += "".join(rng.choices(string.digits, k=6))
        if not any(t.system == SYSTEM and t.ref == tid for t in state.tickets):
            return tid


def _client_names(client: Mapping[str, Any]) -> tuple[str, str]:
    first, _, last = str(client.get("name", "")).partition(" ")
    return first, last


def _client_json(client: Mapping[str, Any]) -> dict[str, Any]:
    first, last = _client_names(client)
    return {
        "id": str(client["id"]),
        "userid": str(client["id"]),
        "client_id": str(client["id"]),
        "firstname": first,
        "lastname": last,
        "fullname": str(client.get("name", "")),
        "companyname": "",
        "email": str(client["email"]),
        "status": "Active",
    }


class WhmcsApi:
    """The command handlers; one instance per app, over the shared state."""

    def __init__(self, state: SimState) -> None:
        self.state = state
        self.access = Access(marker=state.tickets)
        self.codes: dict[str, str] = {}  # ticket id → client-area access code `c`
        self.commands: dict[str, Callable[[Mapping[str, str]], dict[str, Any]]] = {
            "openticket": self.open_ticket,
            "addticketreply": self.add_ticket_reply,
            "getticket": self.get_ticket,
            "gettickets": self.get_tickets,
            "getclientsdetails": self.get_clients_details,
            "getclients": self.get_clients,
            "getsupportstatuses": self.get_support_statuses,
        }

    # -- access ---------------------------------------------------------------------------------

    def current_access(self) -> Access:
        if self.access.marker is not self.state.tickets:  # /_sim/reset happened
            self.access = Access(marker=self.state.tickets)
            self.codes.clear()
        return self.access

    def check_access(self, form: Mapping[str, str], peer: str) -> None:
        access = self.current_access()
        key = form.get("accesskey", "")
        key_ok = bool(access.accesskey) and hmac.compare_digest(
            key.encode(), access.accesskey.encode()
        )
        if not key_ok and peer not in access.allowed_ips:
            raise ApiError(f"Invalid IP {peer}", status=403)
        user = form.get("identifier") or form.get("username", "")
        secret = form.get("secret") or form.get("password", "")
        md5 = hashlib.md5(ADMIN_PASSWORD.encode()).hexdigest()  # legacy API login, as WHMCS does
        ok = (
            hmac.compare_digest(user.encode(), IDENTIFIER.encode())
            and hmac.compare_digest(secret.encode(), SECRET.encode())
        ) or (
            hmac.compare_digest(user.encode(), ADMIN_USERNAME.encode())
            and hmac.compare_digest(secret.lower().encode(), md5.encode())
        )
        if not ok:
            raise ApiError("Authentication Failed", status=403)

    # -- lookups --------------------------------------------------------------------------------

    def client(self, client_id: str) -> dict[str, Any] | None:
        for c in self.state.clients:
            if c["system"] == SYSTEM and str(c["id"]) == client_id:
                return c
        return None

    def ticket_by_id(self, ticket_id: str) -> SimTicket | None:
        # Exact internal id only: AddTicketReply must not accept a public tid by accident.
        for t in self.state.tickets:
            if t.system == SYSTEM and t.id == ticket_id:
                return t
        return None

    def ticket_by_tid(self, tid: str) -> SimTicket | None:
        for t in self.state.tickets:
            if t.system == SYSTEM and t.ref == tid:
                return t
        return None

    def ticket_summary(self, t: SimTicket) -> dict[str, Any]:
        clientid = str(t.fields.get("clientid", "") or "0")
        client = self.client(clientid) if clientid != "0" else None
        return {
            "id": t.id,
            "tid": t.ref,
            "c": self.codes.setdefault(t.id, "".join(random.choices(string.ascii_letters, k=8))),
            "deptid": str(t.fields.get("deptid", "1")),
            "userid": clientid,
            "name": str(client.get("name", "")) if client else str(t.fields.get("name", "")),
            "email": str(client["email"]) if client else t.requester,
            "cc": "",
            "date": _date(t.created_at),
            "subject": t.title,
            "status": _whmcs_status(t),
            "priority": str(t.fields.get("priority", "Medium")),
            "admin": "",
            "lastreply": _date(t.created_at),
            "flag": "0",
            "service": str(t.fields.get("service", "")),
        }

    # -- commands -------------------------------------------------------------------------------

    def _attachments(self, form: Mapping[str, str]) -> list[dict[str, Any]]:
        raw = form.get("attachments", "")
        if not raw:
            return []
        try:
            return decode_attachments(raw)
        except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
            # WHMCS ignores what it cannot decode; the simulator says so loudly instead, so that a
            # wrongly encoded upload fails the test that sent it.
            raise ApiError(f"Invalid attachments: {exc}") from exc

    def open_ticket(self, form: Mapping[str, str]) -> dict[str, Any]:
        clientid = _int_param(form, "clientid")
        client: dict[str, Any] | None = None
        name, email = form.get("name", "").strip(), form.get("email", "").strip()
        if form.get("clientid", "").strip():
            client = self.client(clientid) if clientid else None
            if client is None:
                raise ApiError("Client ID Not Found")
        elif not name or not email:
            raise ApiError("Name and email address are required if not a client")
        elif not _EMAIL_RE.match(email):
            raise ApiError("Email Address Invalid")
        deptid = _int_param(form, "deptid")
        if deptid not in DEPARTMENTS:
            raise ApiError("Department ID not found")
        subject = form.get("subject", "")
        if not subject.strip():
            raise ApiError("Subject is required")
        message = form.get("message", "")
        if not message.strip():
            raise ApiError("Message is required")
        priority = form.get("priority", "")
        if priority not in PRIORITIES:
            priority = "Low"  # WHMCS silently falls back to Low
        service = ""
        serviceid = form.get("serviceid", "").strip()
        if serviceid:
            # Services belong to clients (no service table here: any positive number of a client).
            if client is None or not _int_param(form, "serviceid"):
                raise ApiError("Service ID Not Found")
            service = "S" + _int_param(form, "serviceid")
        customfields: dict[str, str] = {}
        raw_custom = form.get("customfields", "")
        if raw_custom:
            try:
                customfields = decode_customfields(raw_custom)
            except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
                # WHMCS would drop them silently; the simulator fails the call (see attachments).
                raise ApiError(f"Invalid customfields: {exc}") from exc
        attachments = self._attachments(form)
        noemail = _flag(form, "noemail")
        requester = str(client["email"]) if client else email
        fields: dict[str, Any] = {
            "deptid": deptid,
            "priority": priority,
            "customfields": customfields,
            "noemail": noemail,
            "markdown": _flag(form, "markdown") or _flag(form, "useMarkdown"),
        }
        if client is not None:
            fields["clientid"] = clientid
        else:
            fields["name"], fields["email"] = name, email
        if serviceid:
            fields["serviceid"] = _int_param(form, "serviceid")
            fields["service"] = service
        if attachments:
            fields["attachments"] = [{"name": a["name"], "size": a["size"]} for a in attachments]
        ticket = self.state.add_ticket(
            SimTicket(
                system=SYSTEM,
                id=str(self.state.next_id(SYSTEM)),
                ref=_new_tid(self.state),
                title=subject,
                requester=requester,
                fields=fields,
                messages=[
                    SimMessage(
                        body=message,
                        author=f"client:{clientid}" if client is not None else f"guest:{email}",
                        attachments=[a["name"] for a in attachments],
                        fields={"clientid": clientid}
                        if client is not None
                        else {"name": name, "email": email},
                    )
                ],
            )
        )
        code = self.codes.setdefault(ticket.id, "".join(random.choices(string.ascii_letters, k=8)))
        if not noemail:
            self._confirmation(ticket)
        log.info(
            "whmcs_ticket_opened",
            extra={"fields": {"id": ticket.id, "tid": ticket.ref, "deptid": deptid}},
        )
        return {"result": "success", "id": ticket.id, "tid": ticket.ref, "c": code}

    def _confirmation(self, ticket: SimTicket) -> None:
        """The mail real WHMCS sends the customer for a new ticket unless `noemail` is set."""
        subject = f"[Ticket ID: {ticket.ref}] {ticket.title}"
        dept = DEPARTMENTS.get(str(ticket.fields.get("deptid")), "Support")
        self.state.outbox.append(
            {
                "mail_from": "support@whmcs.example.com",
                "rcpt_tos": [ticket.requester],
                "subject": subject,
                "headers": {
                    "From": f"WHMCS {dept} <support@whmcs.example.com>",
                    "To": ticket.requester,
                    "Subject": subject,
                    "Auto-Submitted": "auto-generated",
                },
                "body": f"Thank you for contacting our support team. Ticket #{ticket.ref} "
                "has been opened for your request.",
                "source": "whmcs-autoresponder",
            }
        )

    def add_ticket_reply(self, form: Mapping[str, str]) -> dict[str, Any]:
        """A client reply (`clientid`), an admin reply (`adminusername`) or a guest reply
        (`name` + `email`); `messages[].author` says which: "client:<id>", "admin:<username>",
        "guest:<email>", and `messages[].fields` holds what the call carried."""
        ticket = self.ticket_by_id(_int_param(form, "ticketid"))
        if ticket is None:
            raise ApiError("Ticket ID Not Found")
        name, email = form.get("name", "").strip(), form.get("email", "").strip()
        admin = form.get("adminusername", "").strip()
        fields: dict[str, Any] = {
            "noemail": _flag(form, "noemail"),
            "markdown": _flag(form, "markdown") or _flag(form, "useMarkdown"),
        }
        for key in ("name", "email", "adminusername"):
            if form.get(key, "").strip():
                fields[key] = form[key].strip()
        if form.get("clientid", "").strip():
            clientid = _int_param(form, "clientid")
            if self.client(clientid) is None:
                raise ApiError("Client ID Not Found")
            fields["clientid"] = clientid
            author = f"client:{clientid}"
        elif admin:
            author = f"admin:{admin}"
        elif not name or not email:
            raise ApiError("Name and email address are required if not a client")
        else:
            author = f"guest:{email}"
        message = form.get("message", "")
        if not message.strip():
            raise ApiError("Message is required")
        attachments = self._attachments(form)
        ticket.messages.append(
            SimMessage(
                body=message,
                author=author,
                attachments=[a["name"] for a in attachments],
                fields=fields,
            )
        )
        status = form.get("status", "").strip()
        if status:
            ticket.status = STATUS_KEYS.get(status.lower(), status)
        elif admin:
            ticket.status = "answered"
        else:
            ticket.status = "customer-reply"  # a customer reply reopens a closed ticket, as WHMCS
        log.info(
            "whmcs_ticket_reply", extra={"fields": {"id": ticket.id, "kind": author.split(":")[0]}}
        )
        return {"result": "success"}

    def _reply_who(self, m: SimMessage) -> tuple[str, str, str]:
        """(userid, name, email) of one message, as GetTicket shows a reply's author."""
        kind, _, who = m.author.partition(":")
        if kind == "client":
            client = self.client(who) or {}
            return who, str(client.get("name", "")), str(client.get("email", ""))
        if kind == "guest":
            return "0", str(m.fields.get("name", "")), who
        if kind == "admin":
            return "0", who, ""
        return "0", "", m.author  # a message made over /_sim

    def get_ticket(self, form: Mapping[str, str]) -> dict[str, Any]:
        tid = form.get("ticketnum", "").strip()
        ticket = self.ticket_by_tid(tid) if tid else self.ticket_by_id(_int_param(form, "ticketid"))
        if ticket is None:
            raise ApiError("Ticket ID Not Found")
        summary = self.ticket_summary(ticket)
        out: dict[str, Any] = {"result": "success", "ticketid": summary.pop("id"), **summary}
        out["deptname"] = DEPARTMENTS.get(out["deptid"], "")
        replies = []
        for number, m in enumerate(ticket.messages):
            userid, name, email = self._reply_who(m)
            replies.append(
                {
                    "replyid": str(number),
                    "userid": userid,
                    "contactid": "0",
                    "name": name,
                    "email": email,
                    "date": summary["date"],
                    "message": re.sub(r"<[^>]*>", "", m.body),  # WHMCS strip_tags()s messages
                    "attachment": "|".join(m.attachments),
                    "admin": m.author.partition(":")[2] if m.author.startswith("admin:") else "",
                }
            )
        if form.get("repliessort", "ASC").upper() == "DESC":
            replies.reverse()
        out["replies"] = {"reply": replies}
        out["notes"] = ""
        return out

    def get_tickets(self, form: Mapping[str, str]) -> dict[str, Any]:
        deptid = _int_param(form, "deptid")
        clientid = _int_param(form, "clientid")
        email = form.get("email", "").strip().lower()
        status = form.get("status", "").strip()
        subject = form.get("subject")
        found = []
        for t in self.state.tickets:
            if t.system != SYSTEM:
                continue
            summary = self.ticket_summary(t)
            if deptid and summary["deptid"] != deptid:
                continue
            if clientid and summary["userid"] != clientid:
                continue
            if email and summary["email"].lower() != email:
                continue
            if status == "Awaiting Reply":
                if summary["status"] not in AWAITING_REPLY:
                    continue
            elif status in ("All Active Tickets", "My Flagged Tickets"):
                if summary["status"] not in ACTIVE:
                    continue
            elif status and summary["status"] != status:
                continue
            if subject is not None and subject.lower() not in t.title.lower():  # LIKE '%s%'
                continue
            found.append((t.created_at, int(t.id) if t.id.isdigit() else 0, summary))
        found.sort(key=lambda item: (item[0], item[1]), reverse=True)  # newest reply first
        start = int(form.get("limitstart", "0") or 0) if form.get("limitstart", "").isdigit() else 0
        limit = int(form.get("limitnum", "25")) if form.get("limitnum", "").isdigit() else 25
        page = [s for _, _, s in found[start : start + limit]]
        return {
            "result": "success",
            "totalresults": str(len(found)),
            "startnumber": str(start),
            "numreturned": str(len(page)),
            "tickets": {"ticket": page},
        }

    def get_support_statuses(self, form: Mapping[str, str]) -> dict[str, Any]:
        """The installation's statuses with ticket counts (title and count, as documented):
        WHMCS's six built-in ones and every custom status a ticket was put in (e.g. by
        `POST /_sim/tickets/whmcs/<id>/close` with {"status": "Resolved"})."""
        deptid = _int_param(form, "deptid")
        counts: dict[str, int] = dict.fromkeys((*ACTIVE, "Closed"), 0)
        for t in self.state.tickets:
            if t.system == SYSTEM and (not deptid or str(t.fields.get("deptid")) == deptid):
                title = _whmcs_status(t)
                counts[title] = counts.get(title, 0) + 1
        statuses = [{"title": title, "count": count} for title, count in counts.items()]
        return {
            "result": "success",
            "totalresults": len(statuses),
            "statuses": {"status": statuses},
        }

    def get_clients_details(self, form: Mapping[str, str]) -> dict[str, Any]:
        clientid = form.get("clientid", "").strip()
        email = form.get("email", "").strip()
        if clientid:
            client = self.client(_int_param(form, "clientid"))
        elif email:
            client = self.state.client_by_email(SYSTEM, email)
        else:
            raise ApiError("Either clientid Or email Is Required")
        if client is None:
            raise ApiError("Client Not Found")
        details = _client_json(client)
        return {"result": "success", **details, "client": details}

    def get_clients(self, form: Mapping[str, str]) -> dict[str, Any]:
        search = form.get("search", "").strip().lower()
        found = []
        for c in self.state.clients:
            if c["system"] != SYSTEM:
                continue
            first, last = _client_names(c)
            hay = (str(c["email"]), first, last, str(c.get("name", "")))
            if search and not any(h.lower().startswith(search) for h in hay):
                continue
            j = _client_json(c)
            found.append(
                {k: j[k] for k in ("id", "firstname", "lastname", "companyname", "email", "status")}
            )
        return {
            "result": "success",
            "totalresults": str(len(found)),
            "startnumber": "0",
            "numreturned": str(len(found)),
            "clients": {"client": found},
        }


def _json(data: Mapping[str, Any], status: int = 200) -> web.Response:
    return web.json_response(dict(data), status=status)


def add_routes(app: web.Application, state: SimState) -> None:
    """Register `POST /whmcs/includes/api.php` and `/_sim/whmcs/access` on `app`."""
    api = WhmcsApi(state)

    async def handle(request: web.Request) -> web.Response:
        fault = await state.gate(SYSTEM, request)
        if fault == "error":
            return web.Response(
                status=503,
                text="Service Temporarily Unavailable",
                headers={"Retry-After": "1"},
            )
        form = {k: str(v) for k, v in (await request.post()).items() if isinstance(v, str)}
        form.update({k: v for k, v in request.query.items() if k not in form})
        action = form.get("action", "")
        if form.get("responsetype", "json").lower() != "json":
            # Only JSON is simulated; say so in WHMCS's legacy name=value format.
            return web.Response(
                text="result=error;message=the simulator answers responsetype=json;"
            )
        try:
            if fault == "auth":
                raise ApiError("Authentication Failed", status=403)
            api.check_access(form, request.remote or "")
            command = api.commands.get(action.lower())
            if command is None:
                raise ApiError("Command Not Found")
            if fault == "reject":
                raise ApiError(REJECT_MESSAGES.get(action.lower(), "Invalid request"))
            result = command(form)
        except ApiError as exc:
            log.info(
                "whmcs_api_error",
                extra={"fields": {"action": action, "status": exc.status, "message": exc.message}},
            )
            return _json({"result": "error", "message": exc.message}, status=exc.status)
        return _json(result)

    async def access(request: web.Request) -> web.Response:
        current = api.current_access()
        if request.method == "POST":
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise web.HTTPBadRequest(text=f"body is not JSON: {exc}") from exc
            if not isinstance(body, dict):
                raise web.HTTPBadRequest(text="body must be a JSON object")
            if "allowed_ips" in body:
                current.allowed_ips = {str(ip) for ip in body["allowed_ips"]}
            if "accesskey" in body:
                current.accesskey = str(body["accesskey"] or "")
        return _json({"allowed_ips": sorted(current.allowed_ips), "accesskey": current.accesskey})

    app.router.add_post(PATH, handle)
    app.router.add_get("/_sim/whmcs/access", access)
    app.router.add_post("/_sim/whmcs/access", access)
