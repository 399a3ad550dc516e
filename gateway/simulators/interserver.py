"""InterServer "MyAdmin" SOAP simulator: `/interserver/api.php` (WSDL at `?wsdl`).

Owns the fake of the ticket calls in shared/contracts/interserver.md: `api_login`,
`api_openTicket`, `api_ticketPost`, `api_viewTicket`, `api_getTicketList` (namespace
`urn:myapi`, SOAP 1.1 rpc). Requests are read leniently, by local names only: any envelope and
operation prefix, parameters with or without `xsi:type`, SOAP-ENC `href="#id"` references, and
positional parameters (SOAP::Lite's `c-gensym` names) when the names are not the documented ones.
SOAPAction is ignored. Answers use the literal shape of the bundled WSDL
(`gateway/backends/wsdl/interserver.wsdl`): `<api_xResponse><return>...</return>`, arrays as
`<item>` elements.

How it signals (our choices where the contract is silent, marked [U] there):
- Failed login: `return` is the empty string (documented).
- Invalid, expired (`POST /_sim/sessions/expire`) or refused session: a SOAP Fault, faultcode
  `SOAP-ENV:Client`, faultstring `Invalid Session ID` (the contract says faults are for
  protocol-level problems; a business call never starts without a session).
- Business errors: `status` "Failed" with a `status_text` in the `return` struct (documented).
- Faults injected via `/_sim/fault`: `error` → HTTP 503 with a text body; `reject` → status
  "Failed" with a business text (login is unaffected); `auth` → `api_login` returns "" and every
  session is refused while the fault lasts; `down`/`slow` are applied by `SimState.gate`.
- `api_openTicket` also refuses an empty subject (`Subject is required!`), so that clients have to
  supply one.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

from aiohttp import web
from lxml import etree

from gateway.simulators.state import ACCOUNT_EMAIL, PASSWORD, SimMessage, SimState, SimTicket

log = logging.getLogger("gateway.simulators.interserver")

XmlElement = Any  # an lxml element (lxml names its type only privately)

SYSTEM = "interserver"
PATH = "/interserver/api.php"
NS = "urn:myapi"
SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
XSI = "http://www.w3.org/2001/XMLSchema-instance"
WSDL_SOAP = "http://schemas.xmlsoap.org/wsdl/soap/"

INVALID_SESSION = "Invalid Session ID"
WRONG_EMAIL = "Invalid Email Address - Does not match your account email!"
NO_TICKET = "Error loading ticket details!"
REJECT_OPEN = "Ticket could not be created: request refused by the helpdesk (simulated)"
REJECT_LIST = "Error loading ticket list!"

# Parameter order per operation (the contract's table); used for positional requests.
PARAMS: dict[str, tuple[str, ...]] = {
    "api_login": ("username", "password"),
    "api_openTicket": (
        "sid",
        "user_email",
        "user_ip",
        "subject",
        "product",
        "body",
        "box_auth_value",
    ),
    "api_ticketPost": ("sid", "ticketID", "content"),
    "api_viewTicket": ("sid", "ticketID"),
    "api_getTicketList": ("sid", "page", "limit", "status"),
}

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)


class SoapFault(Exception):
    """Answer the call with a SOAP 1.1 Fault (HTTP 500)."""

    def __init__(self, code: str, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


def _local(tag: object) -> str:
    return etree.QName(tag).localname if isinstance(tag, str) else ""


def _wsdl_text(location: str) -> bytes:
    """The bundled WSDL with its soap:address pointing at `location`."""
    data = (resources.files("gateway") / "backends" / "wsdl" / "interserver.wsdl").read_bytes()
    root = etree.fromstring(data, _PARSER)
    for addr in root.iter(f"{{{WSDL_SOAP}}}address"):
        addr.set("location", location)
    out: bytes = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
    return out


# ---------------------------------------------------------------- request parsing


def _value(el: XmlElement, ids: Mapping[str, XmlElement]) -> str | None:
    href = el.get("href")
    if href and href.startswith("#") and href[1:] in ids:
        el = ids[href[1:]]
    if el.get(f"{{{XSI}}}nil") in ("true", "1"):
        return None
    return "".join(el.itertext())


def parse_call(body: bytes) -> tuple[str, dict[str, str | None]]:
    """Return (operation local name, parameters by name) from a SOAP request."""
    try:
        root = etree.fromstring(body, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise SoapFault("SOAP-ENV:Client", f"Bad Request: {exc}") from exc
    soap_body = next((el for el in root if _local(el.tag) == "Body"), None)
    if _local(root.tag) != "Envelope" or soap_body is None:
        raise SoapFault("SOAP-ENV:Client", "Bad Request: no SOAP Envelope/Body")
    children = [el for el in soap_body if isinstance(el.tag, str)]
    if not children:
        raise SoapFault("SOAP-ENV:Client", "Bad Request: empty SOAP Body")
    ids = {el.get("id", ""): el for el in soap_body.iter() if el.get("id")}
    call = children[0]
    op = _local(call.tag)
    if op not in PARAMS:
        raise SoapFault("SOAP-ENV:Server", f"Procedure '{op}' not present")
    expected = PARAMS[op]
    args = [(_local(el.tag), _value(el, ids)) for el in call if isinstance(el.tag, str)]
    if all(name in expected for name, _ in args):
        params = dict(args)
    else:  # unnamed (SOAP::Lite c-gensymN) parameters: by position
        params = {name: value for name, (_, value) in zip(expected, args, strict=False)}
    return op, params


# ---------------------------------------------------------------- response writing


def _fill(parent: XmlElement, value: Any) -> None:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _fill(etree.SubElement(parent, key), sub)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        for sub in value:
            _fill(etree.SubElement(parent, "item"), sub)
    elif value is None:
        parent.set(f"{{{XSI}}}nil", "true")
    else:
        parent.text = str(value)


def _envelope(content: XmlElement) -> web.Response:
    env = etree.Element(
        f"{{{SOAP_ENV}}}Envelope", nsmap={"SOAP-ENV": SOAP_ENV, "ns1": NS, "xsi": XSI}
    )
    etree.SubElement(env, f"{{{SOAP_ENV}}}Body").append(content)
    status = 500 if _local(content.tag) == "Fault" else 200
    return web.Response(
        body=etree.tostring(env, xml_declaration=True, encoding="UTF-8"),
        status=status,
        content_type="text/xml",
        charset="utf-8",
    )


def response(op: str, result: Any) -> web.Response:
    wrapper = etree.Element(f"{{{NS}}}{op}Response", nsmap={"ns1": NS})
    _fill(etree.SubElement(wrapper, "return"), result)
    return _envelope(wrapper)


def fault(code: str, text: str) -> web.Response:
    el = etree.Element(f"{{{SOAP_ENV}}}Fault")
    etree.SubElement(el, "faultcode").text = code
    etree.SubElement(el, "faultstring").text = text
    return _envelope(el)


# ---------------------------------------------------------------- the system


def _int(value: str | None, default: int) -> int:
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return default


def _statustitle(ticket: SimTicket) -> str:
    return "Closed" if ticket.status == "closed" else "Open"


class InterServerSim:
    """The calls of one simulated InterServer account (ACCOUNT_EMAIL / PASSWORD)."""

    def __init__(self, state: SimState) -> None:
        self.state = state
        # sid -> (session epoch, the state's `calls` dict when issued). `SimState.reset()`
        # replaces that dict, so a session from before a reset is void like one from before
        # /_sim/sessions/expire.
        self.sessions: dict[str, tuple[int, object]] = {}

    def _check_session(self, sid: str | None, mode: str | None) -> None:
        issued = self.sessions.get(sid or "")
        if (
            mode == "auth"
            or issued is None
            or issued[0] != self.state.session_epoch
            or issued[1] is not self.state.calls
        ):
            raise SoapFault("SOAP-ENV:Client", INVALID_SESSION)

    def call(self, op: str, p: dict[str, str | None], mode: str | None) -> Any:
        if op == "api_login":
            return self.login(p, mode)
        self._check_session(p.get("sid"), mode)
        handler = {
            "api_openTicket": self.open_ticket,
            "api_ticketPost": self.ticket_post,
            "api_viewTicket": self.view_ticket,
            "api_getTicketList": self.ticket_list,
        }[op]
        return handler(p, mode == "reject")

    def login(self, p: dict[str, str | None], mode: str | None) -> str:
        if mode == "auth" or p.get("username") != ACCOUNT_EMAIL or p.get("password") != PASSWORD:
            log.info("event=sim_login result=refused")
            return ""
        sid = secrets.token_hex(16)
        self.sessions[sid] = (self.state.session_epoch, self.state.calls)
        return sid

    def open_ticket(self, p: dict[str, str | None], reject: bool) -> dict[str, Any]:
        def failed(text: str) -> dict[str, Any]:
            return {"status": "Failed", "status_text": text, "ticket_reference_id": -1}

        if reject:
            return failed(REJECT_OPEN)
        if (p.get("user_email") or "").strip().lower() != ACCOUNT_EMAIL:
            return failed(WRONG_EMAIL)
        subject = (p.get("subject") or "").strip()
        if not subject:
            return failed("Subject is required!")
        number = self.state.next_id(SYSTEM)
        ticket = SimTicket(
            system=SYSTEM,
            id=str(number),
            ref=str(number),
            title=subject,
            requester=ACCOUNT_EMAIL,
            fields={
                "user_email": p.get("user_email") or "",
                "user_ip": p.get("user_ip") or "",
                "product": p.get("product") or "",
                "box_auth_value": p.get("box_auth_value") or "",
            },
            messages=[SimMessage(body=p.get("body") or "", author=ACCOUNT_EMAIL)],
        )
        self.state.add_ticket(ticket)
        log.info("event=sim_open_ticket id=%s", ticket.id)
        return {"status": "ok", "status_text": "Ticket Created", "ticket_reference_id": number}

    def _ticket(self, p: dict[str, str | None]) -> SimTicket | None:
        return self.state.find(SYSTEM, (p.get("ticketID") or "").strip())

    def ticket_post(self, p: dict[str, str | None], reject: bool) -> dict[str, Any]:
        ticket = None if reject else self._ticket(p)
        if ticket is None:
            return {"status": "Failed", "status_text": NO_TICKET}
        ticket.messages.append(SimMessage(body=p.get("content") or "", author=ACCOUNT_EMAIL))
        ticket.status = "open"  # a customer's reply reopens a closed ticket
        return {"status": "ok", "status_text": "Reply posted"}

    def view_ticket(self, p: dict[str, str | None], reject: bool) -> dict[str, Any]:
        ticket = None if reject else self._ticket(p)
        if ticket is None:
            return {"status": "Failed", "status_text": NO_TICKET}
        stamp = str(int(ticket.created_at))
        return {
            "status": "ok",
            "status_text": "Ticket details",
            "result": {
                "ticket_reference_id": ticket.ref,
                "full_name": ticket.requester,
                "email": ticket.requester,
                "subject": ticket.title,
                "creationtime": stamp,
                "statustitle": _statustitle(ticket),
                "prioritytitle": "Standard",
                "lastactivity": stamp,
                "posts": [
                    {
                        "email": m.author,
                        "full_name": m.author,
                        "dateline": stamp,
                        "contents": m.body,
                    }
                    for m in ticket.messages
                ],
            },
        }

    def ticket_list(self, p: dict[str, str | None], reject: bool) -> dict[str, Any]:
        if reject:
            return {"status": "Failed", "status_text": REJECT_LIST, "totalPages": "0"}
        wanted = (p.get("status") or "").strip().lower()
        tickets = [
            t
            for t in self.state.tickets
            if t.system == SYSTEM and (not wanted or _statustitle(t).lower() == wanted)
        ]
        # Newest first, like the live list (ordered by last activity).
        tickets.sort(key=lambda t: (t.created_at, _int(t.id, 0)), reverse=True)
        limit = _int(p.get("limit"), 10)
        limit = limit if limit > 0 else 10
        page = max(_int(p.get("page"), 1), 1)
        chunk = tickets[(page - 1) * limit : page * limit]
        return {
            "status": "ok",
            "status_text": "List of tickets",
            # The live API sends the unrounded quotient ("4.1"); so do we.
            "totalPages": f"{len(tickets) / limit:g}",
            "tickets": [
                {
                    "ticket_id": t.id,
                    "ticket_reference_id": t.ref,
                    "subject": t.title,
                    "lastreplier": t.messages[-1].author if t.messages else t.requester,
                    "statustitle": _statustitle(t),
                    "prioritytitle": "Standard",
                    "replies": str(max(len(t.messages) - 1, 0)),
                    "lastactivity": str(int(t.created_at)),
                }
                for t in chunk
            ],
        }


def add_routes(app: web.Application, state: SimState) -> None:
    """Register `/interserver/api.php` (POST: SOAP calls, GET ?wsdl: the WSDL) on `app`."""
    sim = InterServerSim(state)

    async def get(request: web.Request) -> web.Response:
        if "wsdl" not in {k.lower() for k in request.query}:
            raise web.HTTPBadRequest(text="POST SOAP calls here; the WSDL is at ?wsdl")
        if await state.gate(SYSTEM, request) == "error":
            raise web.HTTPServiceUnavailable(text="Service temporarily unavailable")
        location = str(request.url.with_query(None))
        return web.Response(body=_wsdl_text(location), content_type="text/xml", charset="utf-8")

    async def post(request: web.Request) -> web.Response:
        mode = await state.gate(SYSTEM, request)
        if mode == "error":
            raise web.HTTPServiceUnavailable(text="Service temporarily unavailable")
        body = await request.read()
        try:
            op, params = parse_call(body)
            return response(op, sim.call(op, params, mode))
        except SoapFault as exc:
            log.info("event=sim_fault code=%s text=%r", exc.code, exc.text)
            return fault(exc.code, exc.text)

    app.router.add_get(PATH, get)
    app.router.add_post(PATH, post)
