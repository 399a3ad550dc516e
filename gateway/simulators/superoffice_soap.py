"""Simulator of the SuperOffice Service (ex-eJournal) customer SOAP port.

Owns `POST /superoffice/soap/customer` (the SOAP endpoint) and `GET ...customer?wsdl` (our packaged
synthetic WSDL, with `soap:address` pointing at the requesting host). Behaviour follows
shared/contracts/superoffice-soap.md:

- Every answer is HTTP 200 in rpc/literal shape, `errorCode` first ("0" = ok), then the out parts;
  business errors are codes, never SOAP faults. `getErrorMessage` returns the session's last error.
- `login` checks the demo account (state.ACCOUNT_EMAIL / state.PASSWORD), else code 1. Session keys
  are random hex; they expire after `session_idle` seconds without use, and all of them at once when
  `state.session_epoch` changes (`POST /_sim/sessions/expire`): code 5.
- `newTicket` accepts only external categories (8) and priorities or -1 (9), sLevel 1/2 (10), extra
  fields `x_1`..`x_5` (12). `addMessage` needs a ticket of the account (13), sLevel 1/2 (10) and
  known attachment ids (16); a customer message reopens a closed ticket. `getTicket` skips unknown
  field names and does not show internal (sLevel 1) tickets.
- Faults (`state.gate`): "error" → HTTP 503; "reject" → the call's permanent business error
  (newTicket 8, addMessage/getTicket 13, addAttachment 6); "auth" → login code 1 and code 5 for
  every call made with a session. A wrong HTTP method or an unreadable request → SOAP Fault,
  HTTP 500.

Requests are read leniently: the operation is the Body's first child element and parameters are
found by local name (namespaces and xsi:type ignored); an array parameter's items are its children.

Ticket status is numeric in `getTicket` (`ticket.status`, TypeInteger), as in the real database
(EnumTicketBaseStatus: 1 active, 2 closed).

A second endpoint, `/superoffice/soap/customer-alt` (WSDL at `?wsdl`), serves the same tickets
through an "installation-style" WSDL (`simulators/wsdl/superoffice_customer_alt.wsdl`): another
namespace, other part names, rpc/encoded answers with `xsi:type` and SOAP-ENC arrays. There,
request parameters are read by position (the documented order) and answers are written with that
WSDL's output part names, so a client that depends on our packaged WSDL's names fails there.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from aiohttp import web
from lxml import etree

from gateway.simulators.state import ACCOUNT_EMAIL, PASSWORD, SimMessage, SimState, SimTicket

log = logging.getLogger("gateway.simulators.superoffice_soap")

XmlElement = Any  # an lxml element (lxml names its type only privately)

SYSTEM = "superoffice-soap"
PATH = "/superoffice/soap/customer"
ALT_PATH = "/superoffice/soap/customer-alt"
TNS = "urn:superoffice:cs:customer"
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP_ENC = "http://schemas.xmlsoap.org/soap/encoding/"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
XSD = "http://www.w3.org/2001/XMLSchema"
WSDL_NS = "http://schemas.xmlsoap.org/wsdl/"
# EnumTicketBaseStatus (SuperOfficeDocs docs/database/tables/enums/EnumTicketBaseStatus.md)
STATUS_ACTIVE = "1"
STATUS_CLOSED = "2"
WSDL_ADDRESS = re.compile(rb'(<soap:address\s+location=")[^"]*(")')
DEFAULT_SESSION_IDLE = 30 * 60.0  # seconds; the documented default of the real system


@dataclass(frozen=True)
class Category:
    id: int
    name: str
    external: bool


@dataclass(frozen=True)
class Priority:
    id: int
    name: str
    sort_order: int
    external: bool


CATEGORIES = (
    Category(1, "Support", True),
    Category(2, "Sales", True),
    Category(3, "Billing", True),
    Category(4, "Internal", False),
)
PRIORITIES = (
    Priority(1, "Low", 1, True),
    Priority(2, "Medium", 2, True),
    Priority(3, "High", 3, True),
    Priority(4, "Critical (internal)", 4, False),
)
DEFAULT_PRIORITY = 2  # what the system decides for priorityId -1
EXTRA_FIELDS = frozenset(f"x_{n}" for n in range(1, 6))

# Codes of shared/contracts/superoffice-soap.md and the text getErrorMessage gives for them.
OK = 0
E_LOGIN = 1
E_SESSION = 5
E_ILLEGAL = 6
E_CATEGORY = 8
E_PRIORITY = 9
E_SLEVEL = 10
E_EXTRA = 12
E_TICKET = 13
E_ATTACHMENT = 16

_XML_INVALID = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")


@dataclass
class Session:
    epoch: int
    last_used: float
    last_error: str = ""


@dataclass(frozen=True)
class StoredAttachment:
    name: str
    content_type: str
    size: int


@dataclass
class Call:
    """One parsed request: the operation name and its parameters by local name."""

    op: str
    params: dict[str, XmlElement] = field(default_factory=dict)

    def text(self, name: str) -> str:
        el = self.params.get(name)
        return (el.text or "").strip() if el is not None else ""

    def raw_text(self, name: str) -> str:
        """The text as sent (no stripping): message bodies and titles keep their whitespace."""
        el = self.params.get(name)
        return (el.text or "") if el is not None else ""

    def items(self, name: str) -> list[XmlElement]:
        el = self.params.get(name)
        return [c for c in el if isinstance(c.tag, str)] if el is not None else []

    def strings(self, name: str) -> list[str]:
        return [(c.text or "").strip() for c in self.items(name)]

    def structs(self, name: str) -> list[dict[str, str]]:
        return [
            {etree.QName(m).localname: (m.text or "") for m in item if isinstance(m.tag, str)}
            for item in self.items(name)
        ]


class SoapFault(Exception):
    """Answered as a SOAP 1.1 Fault with HTTP 500."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


Reply = tuple[int, list[tuple[str, Any]]]  # (error code, out parts after errorCode)


def _int(value: str) -> int | None:
    try:
        return int(value.strip())
    except ValueError:
        return None


def _clean(value: str) -> str:
    """Drop characters XML 1.0 cannot carry (a ticket made over /_sim may hold any text)."""
    return _XML_INVALID.sub("", value)


def _add(parent: XmlElement, name: str, value: Any) -> None:
    el = etree.SubElement(parent, name)
    if isinstance(value, list):
        for item in value:
            _add(el, "item", item)
    elif isinstance(value, dict):
        for k, v in value.items():
            _add(el, k, v)
    elif value is not None:
        el.text = _clean(str(value))


def _envelope() -> tuple[XmlElement, XmlElement]:
    env = etree.Element(f"{{{SOAP_ENV}}}Envelope", nsmap={"SOAP-ENV": SOAP_ENV, "tns": TNS})
    body = etree.SubElement(env, f"{{{SOAP_ENV}}}Body")
    return env, body


def _xml_response(env: XmlElement, status: int = 200) -> web.Response:
    return web.Response(
        body=etree.tostring(env, xml_declaration=True, encoding="UTF-8"),
        status=status,
        content_type="text/xml",
        charset="utf-8",
    )


def response_xml(op: str, parts: list[tuple[str, Any]]) -> web.Response:
    """`<tns:{op}Response>` with one unqualified child per part (rpc/literal, as the WSDL says)."""
    env, body = _envelope()
    resp = etree.SubElement(body, f"{{{TNS}}}{op}Response")
    for name, value in parts:
        _add(resp, name, value)
    return _xml_response(env)


def fault_xml(code: str, message: str) -> web.Response:
    env, body = _envelope()
    fault = etree.SubElement(body, f"{{{SOAP_ENV}}}Fault")
    etree.SubElement(fault, "faultcode").text = f"SOAP-ENV:{code}"
    etree.SubElement(fault, "faultstring").text = _clean(message)
    return _xml_response(env, status=500)


def parse_request(data: bytes) -> Call:
    """Find the operation and its parameters; raise SoapFault("Client") when that is impossible."""
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, huge_tree=True, remove_comments=True
    )
    try:
        root = etree.fromstring(data, parser)
    except etree.XMLSyntaxError as exc:
        raise SoapFault("Client", f"request is not well-formed XML: {exc}") from exc
    if root is None or etree.QName(root).localname != "Envelope":
        raise SoapFault("Client", "request is not a SOAP envelope")
    body = next(
        (c for c in root if isinstance(c.tag, str) and etree.QName(c).localname == "Body"), None
    )
    if body is None:
        raise SoapFault("Client", "SOAP envelope has no Body")
    op_el = next((c for c in body if isinstance(c.tag, str)), None)
    if op_el is None:
        raise SoapFault("Client", "SOAP Body is empty")
    call = Call(op=etree.QName(op_el).localname)
    for child in op_el:
        if isinstance(child.tag, str):
            call.params.setdefault(etree.QName(child).localname, child)
    return call


def wsdl_bytes() -> bytes:
    """The packaged synthetic WSDL (the same file the backend loads)."""
    return (
        resources.files("gateway.backends")
        .joinpath("wsdl")
        .joinpath("superoffice_customer.wsdl")
        .read_bytes()
    )


def alt_wsdl_bytes() -> bytes:
    """The installation-style WSDL of `/superoffice/soap/customer-alt`."""
    return (
        resources.files("gateway.simulators")
        .joinpath("wsdl")
        .joinpath("superoffice_customer_alt.wsdl")
        .read_bytes()
    )


@dataclass(frozen=True)
class Dialect:
    """How one WSDL names things: per operation the input and output part names in order, and
    for each array type (by local name) its item type (a QName text such as "xsd:int")."""

    namespace: str
    inputs: dict[str, tuple[str, ...]]
    outputs: dict[str, tuple[str, ...]]
    part_types: dict[tuple[str, str], str]  # (op, output part) -> type local name
    item_types: dict[str, str]  # array type local name -> item type ("xsd:int", "ns:X")
    encoded: bool


def read_dialect(data: bytes) -> Dialect:
    root = etree.fromstring(data, etree.XMLParser(resolve_entities=False, no_network=True))
    messages: dict[str, list[tuple[str, str]]] = {}
    for msg in root.iter(f"{{{WSDL_NS}}}message"):
        messages[msg.get("name", "")] = [
            (p.get("name", ""), p.get("type", "").rpartition(":")[2])
            for p in msg.iter(f"{{{WSDL_NS}}}part")
        ]
    inputs: dict[str, tuple[str, ...]] = {}
    outputs: dict[str, tuple[str, ...]] = {}
    part_types: dict[tuple[str, str], str] = {}
    for op in root.iter(f"{{{WSDL_NS}}}operation"):
        inp, out = op.find(f"{{{WSDL_NS}}}input"), op.find(f"{{{WSDL_NS}}}output")
        if inp is None or out is None or not inp.get("message"):
            continue  # a binding operation
        name = op.get("name", "")
        in_parts = messages.get(str(inp.get("message")).rpartition(":")[2], [])
        out_parts = messages.get(str(out.get("message")).rpartition(":")[2], [])
        inputs[name] = tuple(n for n, _ in in_parts)
        outputs[name] = tuple(n for n, _ in out_parts)
        for part, kind in out_parts:
            part_types[(name, part)] = kind
    item_types: dict[str, str] = {}
    for ct in root.iter(f"{{{XSD}}}complexType"):
        for attr in ct.iter(f"{{{XSD}}}attribute"):
            array_type = attr.get(f"{{{WSDL_NS}}}arrayType")
            if array_type:
                item_types[ct.get("name", "")] = array_type.split("[", 1)[0]
    return Dialect(
        namespace=root.get("targetNamespace", ""),
        inputs=inputs,
        outputs=outputs,
        part_types=part_types,
        item_types=item_types,
        encoded='use="encoded"' in data.decode("utf-8", "replace"),
    )


def _add_encoded(parent: Any, name: str, value: Any, kind: str, d: Dialect) -> None:
    """One rpc/encoded part: `xsi:type` on every value, arrays as SOAP-ENC:Array."""
    el = etree.SubElement(parent, name)
    if isinstance(value, list):
        item = d.item_types.get(kind, "xsd:string")
        el.set(f"{{{XSI}}}type", "SOAP-ENC:Array")
        el.set(f"{{{SOAP_ENC}}}arrayType", f"{item}[{len(value)}]")
        for v in value:
            child = etree.SubElement(el, "item")
            child.set(f"{{{XSI}}}type", item)
            if isinstance(v, dict):
                for k, sub in v.items():
                    member = etree.SubElement(child, k)
                    member.set(f"{{{XSI}}}type", "xsd:string")
                    member.text = _clean(str(sub))
            else:
                child.text = _clean(str(v))
    else:
        el.set(f"{{{XSI}}}type", "xsd:string")
        el.text = _clean(str(value)) if value is not None else ""


def response_alt(op: str, values: list[Any], d: Dialect) -> web.Response:
    """The answer in the installation-style WSDL's shape: its part names by position."""
    env = etree.Element(
        f"{{{SOAP_ENV}}}Envelope",
        nsmap={
            "SOAP-ENV": SOAP_ENV,
            "SOAP-ENC": SOAP_ENC,
            "xsi": XSI,
            "xsd": XSD,
            "ns": d.namespace,
        },
    )
    env.set(f"{{{SOAP_ENV}}}encodingStyle", SOAP_ENC)
    body = etree.SubElement(env, f"{{{SOAP_ENV}}}Body")
    resp = etree.SubElement(body, f"{{{d.namespace}}}{op}Response")
    for name, value in zip(d.outputs.get(op, ()), values, strict=False):
        _add_encoded(resp, name, value, d.part_types.get((op, name), ""), d)
    return _xml_response(env)


class CustomerPortSim:
    """State and operations of the simulated customer port (sessions, attachments, errors)."""

    def __init__(self, state: SimState, *, session_idle: float = DEFAULT_SESSION_IDLE) -> None:
        self.state = state
        self.session_idle = session_idle
        self.sessions: dict[str, Session] = {}
        self.attachments: dict[str, StoredAttachment] = {}
        self._next_attachment = 5001
        self._next_message = 9001
        self._message_ids: dict[tuple[str, int], str] = {}
        self.ours = read_dialect(wsdl_bytes())
        self.alt = read_dialect(alt_wsdl_bytes())
        self._ops: dict[str, Callable[[Call, str | None], Awaitable[Reply]]] = {
            "login": self.login,
            "logout": self.logout,
            "newTicket": self.new_ticket,
            "addMessage": self.add_message,
            "addAttachment": self.add_attachment,
            "getTicket": self.get_ticket,
            "getCategories": self.get_categories,
            "getPriorities": self.get_priorities,
        }

    # -- HTTP ---------------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """The customer port as our packaged WSDL describes it (`PATH`)."""
        return await self._serve(request, None)

    async def handle_alt(self, request: web.Request) -> web.StreamResponse:
        """The same port as the installation-style WSDL describes it (`ALT_PATH`)."""
        return await self._serve(request, self.alt)

    async def _serve(self, request: web.Request, alt: Dialect | None) -> web.StreamResponse:
        mode = await self.state.gate(SYSTEM, request)
        if mode == "error":
            return web.Response(status=503, text="server busy", headers={"Retry-After": "1"})
        if request.method in ("GET", "HEAD") and "wsdl" in {k.lower() for k in request.query}:
            path = PATH if alt is None else ALT_PATH
            location = f"{request.scheme}://{request.host}{path}".encode()
            source = wsdl_bytes() if alt is None else alt_wsdl_bytes()
            body = WSDL_ADDRESS.sub(lambda m: m.group(1) + location + m.group(2), source)
            return web.Response(body=body, content_type="text/xml", charset="utf-8")
        if request.method != "POST":
            return fault_xml("Client", f"method {request.method} not allowed; POST a SOAP request")
        try:
            call = parse_request(await request.read())
            if alt is not None:
                call = self._by_position(call, alt)
            if call.op == "getErrorMessage":
                text = self.error_message(call.text("sessionKey"), mode)
                if alt is not None:
                    return response_alt(call.op, [text], alt)
                return response_xml(call.op, [("errorMessage", text)])
            handler = self._ops.get(call.op)
            if handler is None:
                raise SoapFault("Client", f"unknown operation {call.op}")
            code, parts = await handler(call, mode)
        except SoapFault as exc:
            log.info("soap_fault", extra={"fields": {"code": exc.code}})
            return fault_xml(exc.code, exc.message)
        log.debug("call", extra={"fields": {"op": call.op, "code": code}})
        if alt is not None:
            outs = [value for _, value in parts]
            if call.op == "getTicket":
                outs = [outs[0], [int(i) for i in outs[1]]] if outs else outs  # int[]
            return response_alt(call.op, [str(code), *outs], alt)
        return response_xml(call.op, [("errorCode", str(code)), *parts])

    def _by_position(self, call: Call, alt: Dialect) -> Call:
        """Parameters named as our packaged WSDL names them, taken by position."""
        ours = self.ours.inputs.get(call.op)
        theirs = alt.inputs.get(call.op)
        if ours is None or theirs is None:
            return call
        renamed = Call(op=call.op)
        for mine, their in zip(ours, theirs, strict=False):
            if their in call.params:
                renamed.params[mine] = call.params[their]
        return renamed

    # -- sessions and errors ------------------------------------------------------------------

    def _session(self, key: str) -> Session | None:
        s = self.sessions.get(key)
        if s is None:
            return None
        now = time.monotonic()
        if s.epoch != self.state.session_epoch or now - s.last_used > self.session_idle:
            del self.sessions[key]
            return None
        s.last_used = now
        return s

    def _check(self, call: Call, mode: str | None) -> Session | None:
        """The call's valid session, or None (code 5); an "auth" fault voids every session."""
        key = call.text("sessionKey")
        if mode == "auth":
            self.sessions.pop(key, None)
            return None
        return self._session(key)

    @staticmethod
    def _fail(session: Session, code: int, text: str) -> Reply:
        session.last_error = text
        return code, []

    def error_message(self, key: str, mode: str | None) -> str:
        s = self.sessions.get(key)
        if mode == "auth" or s is None or s.epoch != self.state.session_epoch:
            return "Invalid session key (expired or corrupt)"
        return s.last_error

    def _ticket(self, ticket_id: str) -> SimTicket | None:
        # Every superoffice-soap ticket belongs to the one simulated customer account.
        return self.state.find(SYSTEM, ticket_id) if ticket_id else None

    def _message_id(self, ticket: SimTicket, index: int) -> str:
        key = (ticket.id, index)
        if key not in self._message_ids:
            self._message_ids[key] = str(self._next_message)
            self._next_message += 1
        return self._message_ids[key]

    # -- operations ---------------------------------------------------------------------------

    async def login(self, call: Call, mode: str | None) -> Reply:
        if mode == "auth" or (
            call.text("username") != ACCOUNT_EMAIL or call.raw_text("password") != PASSWORD
        ):
            log.info("login_refused", extra={"fields": {}})
            return E_LOGIN, [("sessionKey", "")]
        key = secrets.token_hex(16)
        self.sessions[key] = Session(epoch=self.state.session_epoch, last_used=time.monotonic())
        return OK, [("sessionKey", key)]

    async def logout(self, call: Call, mode: str | None) -> Reply:
        if self._check(call, mode) is None:
            return E_SESSION, []
        self.sessions.pop(call.text("sessionKey"), None)
        return OK, []

    async def new_ticket(self, call: Call, mode: str | None) -> Reply:
        s = self._check(call, mode)
        if s is None:
            return E_SESSION, [("ticketId", "")]
        if mode == "reject":
            return self._fail(s, E_CATEGORY, "Invalid category (simulated rejection)")
        slevel = _int(call.text("sLevel"))
        if slevel not in (1, 2):
            return self._fail(s, E_SLEVEL, f"Invalid security level {call.text('sLevel')!r}")
        cat = _int(call.text("categoryId"))
        if not any(c.id == cat and c.external for c in CATEGORIES):
            return self._fail(s, E_CATEGORY, f"Invalid category {call.text('categoryId')!r}")
        prio = _int(call.text("priorityId"))
        if prio != -1 and not any(p.id == prio and p.external for p in PRIORITIES):
            return self._fail(s, E_PRIORITY, f"Invalid priority {call.text('priorityId')!r}")
        extra: dict[str, str] = {}
        for pair in call.structs("extraField"):
            name = pair.get("field", "").strip()
            if name not in EXTRA_FIELDS:
                return self._fail(s, E_EXTRA, f"Invalid extra field {name!r}")
            extra[name] = pair.get("value", "")
        tid = str(self.state.next_id(SYSTEM))
        while self.state.find(SYSTEM, tid) is not None:  # an id taken by POST /_sim/tickets
            tid = str(self.state.next_id(SYSTEM))
        self.state.add_ticket(
            SimTicket(
                system=SYSTEM,
                id=tid,
                ref=tid,
                title=call.raw_text("title"),
                requester=ACCOUNT_EMAIL,
                fields={
                    "categoryId": cat,
                    "priorityId": prio,
                    "sLevel": slevel,
                    "extraField": extra,
                },
            )
        )
        log.info("ticket_created", extra={"fields": {"ticket_id": tid}})
        return OK, [("ticketId", tid)]

    async def add_message(self, call: Call, mode: str | None) -> Reply:
        s = self._check(call, mode)
        if s is None:
            return E_SESSION, [("messageId", "")]
        if mode == "reject":
            return self._fail(s, E_TICKET, "Unknown ticket (simulated rejection)")
        ticket = self._ticket(call.text("ticketId"))
        if ticket is None:
            return self._fail(s, E_TICKET, f"Unknown ticket {call.text('ticketId')!r}")
        if _int(call.text("sLevel")) not in (1, 2):
            return self._fail(s, E_SLEVEL, f"Invalid security level {call.text('sLevel')!r}")
        names = []
        for att_id in call.strings("attachmentIds"):
            att = self.attachments.get(att_id)
            if att is None:
                return self._fail(s, E_ATTACHMENT, f"Unknown attachment {att_id!r}")
            names.append(att.name)
        ticket.messages.append(
            SimMessage(body=call.raw_text("messageBody"), author=ACCOUNT_EMAIL, attachments=names)
        )
        if ticket.status == "closed":  # a customer's message reopens the ticket
            ticket.status = "open"
        return OK, [("messageId", self._message_id(ticket, len(ticket.messages) - 1))]

    async def add_attachment(self, call: Call, mode: str | None) -> Reply:
        s = self._check(call, mode)
        if s is None:
            return E_SESSION, [("attachmentId", "")]
        if mode == "reject":
            return self._fail(s, E_ILLEGAL, "Attachments are not allowed (simulated rejection)")
        try:
            data = base64.b64decode("".join(call.raw_text("data").split()), validate=True)
        except (binascii.Error, ValueError):
            return self._fail(s, E_ATTACHMENT, "Attachment data is not valid base64")
        att_id = str(self._next_attachment)
        self._next_attachment += 1
        self.attachments[att_id] = StoredAttachment(
            name=call.raw_text("attachmentName").strip() or "attachment",
            content_type=call.text("contentType") or "application/octet-stream",
            size=len(data),
        )
        return OK, [("attachmentId", att_id)]

    async def get_ticket(self, call: Call, mode: str | None) -> Reply:
        s = self._check(call, mode)
        if s is None:
            return E_SESSION, [("ticketResult", []), ("messageIds", [])]
        if mode == "reject":
            return self._fail(s, E_TICKET, "Unknown ticket (simulated rejection)")
        ticket = self._ticket(call.text("ticketId"))
        if ticket is None or str(ticket.fields.get("sLevel", 2)) == "1":  # only external tickets
            return self._fail(s, E_TICKET, f"Unknown ticket {call.text('ticketId')!r}")
        known = self._ticket_fields(ticket)
        result = [
            {"field": name, "value": known[name][0], "type": known[name][1]}
            for name in call.strings("ticketFields")
            if name in known  # unknown names are skipped silently, as the real port does
        ]
        ids = [self._message_id(ticket, i) for i in range(len(ticket.messages))]
        return OK, [("ticketResult", result), ("messageIds", ids)]

    @staticmethod
    def _ticket_fields(ticket: SimTicket) -> dict[str, tuple[str, str]]:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ticket.created_at))
        prio = ticket.fields.get("priorityId", -1)
        extra = ticket.fields.get("extraField") or {}
        fields = {
            "ticket.id": (ticket.id, "TypeRequestId"),
            "ticket.title": (ticket.title, "TypeVarchar"),
            "ticket.created_at": (stamp, "TypeDateTime"),
            "ticket.category": (str(ticket.fields.get("categoryId", 1)), "TypeForeignKey"),
            "ticket.status": (
                STATUS_CLOSED if ticket.status == "closed" else STATUS_ACTIVE,
                "TypeInteger",
            ),
            "ticket.replied_at": ("", "TypeDateTime"),
            "ticket.closed_at": ("", "TypeDateTime"),
            "ticket.priority": (
                str(DEFAULT_PRIORITY if prio in (-1, "-1") else prio),
                "TypeForeignKey",
            ),
            "ticket.read_by_customer": ("1", "TypeBool"),
            "ticket.has_attachment": (
                "1" if any(m.attachments for m in ticket.messages) else "0",
                "TypeBool",
            ),
            "ticket_last_changed": (stamp, "TypeDateTime"),
        }
        for name in sorted(EXTRA_FIELDS):
            fields[f"ticket.{name}"] = (str(extra.get(name, "")), "TypeVarchar")
        return fields

    async def get_categories(self, call: Call, mode: str | None) -> Reply:
        # The session key may be empty here; a given one must be valid.
        if call.text("sessionKey") and self._check(call, mode) is None:
            return E_SESSION, [("categoryIds", [])]
        cats = [
            {"id": str(c.id), "name": c.name, "parentId": "-1"} for c in CATEGORIES if c.external
        ]
        return OK, [("categoryIds", cats)]

    async def get_priorities(self, call: Call, mode: str | None) -> Reply:
        if self._check(call, mode) is None:
            return E_SESSION, [("priorities", [])]
        prios = sorted((p for p in PRIORITIES if p.external), key=lambda p: p.sort_order)
        return OK, [
            (
                "priorities",
                [{"id": str(p.id), "name": p.name, "sortOrder": str(p.sort_order)} for p in prios],
            )
        ]


SIM_KEY = web.AppKey("superoffice_soap_sim", CustomerPortSim)


def add_routes(
    app: web.Application, state: SimState, *, session_idle: float = DEFAULT_SESSION_IDLE
) -> None:
    """Register the customer port (every method, so a wrong one gets a SOAP Fault) on `app`.

    The simulator object is kept in `app[SIM_KEY]` so tests can shorten `session_idle`.
    """
    sim = CustomerPortSim(state, session_idle=session_idle)
    app[SIM_KEY] = sim
    app.router.add_route("*", PATH, sim.handle)
    app.router.add_route("*", ALT_PATH, sim.handle_alt)
