"""InterServer "MyAdmin" SOAP simulator: `/interserver/api.php` (WSDL at `?wsdl`).

Owns the fake of the ticket calls in shared/contracts/interserver.md: `api_login`,
`api_openTicket`, `api_ticketPost`, `api_viewTicket`, `api_getTicketList` (namespace
`urn:myapi`, SOAP 1.1 rpc). Requests are read leniently, by local names only: any envelope and
operation prefix, parameters with or without `xsi:type`, SOAP-ENC `href="#id"` references, and
positional parameters (SOAP::Lite's `c-gensym` names) when the names are not the documented ones.
SOAPAction is ignored. Answers use the literal shape of the bundled WSDL
(`gateway/backends/wsdl/interserver.wsdl`): `<api_xResponse><return>...</return>`, arrays as
`<item>` elements.

How it signals (as the server's own code does, `detain/myadmin-kayako-support` `src/api.php`;
our choices where that is silent):
- Failed login: `return` is the empty string (documented).
- Invalid, expired (`POST /_sim/sessions/expire`) or refused session: a SOAP Fault, faultcode
  `SOAP-ENV:Client`, faultstring `Invalid Session ID` (not in the public code: our choice).
- `api_openTicket` answers `status "success"` ("created ticket successfully.") with a Kayako mask
  such as `KVO-530-34143` as `ticket_reference_id`; it refuses (`status "Failed"`) an empty
  `user_email` or `user_ip`, an invalid address, another account's address, an empty subject.
  A non-empty `product` rewrites the ticket as the server does: body `"<product>\n\n<body>"`,
  and a subject shorter than 30 characters becomes `"<product> : <subject>"`.
- `api_viewTicket` / `api_ticketPost` answer `status "Success"`; a ticket is found by its mask or
  its numeric Kayako id. Business errors: `status "Failed"` with a `status_text`.
- `api_getTicketList` ignores its `status` argument, lists the account's tickets that are not
  closed (the server's Kayako status ids 4, 5, 6), newest activity first; `totalPages` is the
  unrounded quotient rows / limit.
- Faults injected via `/_sim/fault`: `error` → what Kayako's failures look like: lowercase
  `status "failed"` with "Kayako exception occurred ... Please try again!" for `api_openTicket`
  (nothing created; but with a non-empty `box_auth_value` the ticket IS created and the answer is
  the "updating root/admin pass" failure, as on the real server) and `api_getTicketList`; HTTP 503
  for the others; `reject` → `status "Failed"` with a business text (login is unaffected);
  `auth` → `api_login` returns "" and every session is refused while the fault lasts;
  `down`/`slow` are applied by `SimState.gate`.
"""

from __future__ import annotations

import logging
import re
import secrets
import string
import time
from collections.abc import Callable, Mapping, Sequence
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
REJECT_OPEN = "Kayako ticket creation failed"
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


_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
TRY_AGAIN_OPEN = "Kayako exception occurred creating ticket. Please try again!"
TRY_AGAIN_ROOT_PASS = "Kayako exception occurred updating root/admin pass. Please try again!"
TRY_AGAIN_LIST = "Kayako exception occurred searching tickets. Please try again!"
SHORT_SUBJECT = 30  # a subject shorter than this gets the product in front (mb_strlen)


def new_mask(taken: Callable[[str], bool]) -> str:
    """A Kayako display id such as `KVO-530-34143` that `taken` does not know yet."""
    while True:
        mask = "{}-{:03d}-{:05d}".format(
            "".join(secrets.choice(string.ascii_uppercase) for _ in range(3)),
            secrets.randbelow(1000),
            secrets.randbelow(100000),
        )
        if not taken(mask):
            return mask


def rewrite(product: str, subject: str, body: str) -> tuple[str, str]:
    """What the server does with a non-empty `product` before it creates the ticket."""
    if not product:
        return subject, body
    body = f"{product}\n\n{body}"
    if len(subject) < SHORT_SUBJECT:
        subject = f"{product} : {subject}"
    return subject, body


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
        if op == "api_openTicket":
            return self.open_ticket(p, mode)
        if op == "api_getTicketList":
            return self.ticket_list(p, mode)
        if mode == "error":
            raise Busy
        handler = {"api_ticketPost": self.ticket_post, "api_viewTicket": self.view_ticket}[op]
        return handler(p, mode == "reject")

    def login(self, p: dict[str, str | None], mode: str | None) -> str:
        if mode == "error":
            raise Busy
        if mode == "auth" or p.get("username") != ACCOUNT_EMAIL or p.get("password") != PASSWORD:
            log.info("sim_login", extra={"fields": {"result": "refused"}})
            return ""
        sid = secrets.token_hex(16)
        self.sessions[sid] = (self.state.session_epoch, self.state.calls)
        return sid

    def open_ticket(self, p: dict[str, str | None], mode: str | None) -> dict[str, Any]:
        def failed(text: str, status: str = "Failed") -> dict[str, Any]:
            return {"status": status, "status_text": text, "ticket_reference_id": -1}

        email = (p.get("user_email") or "").strip()
        if not email:
            return failed("User email is required. Please try again!")
        if not (p.get("user_ip") or "").strip():
            return failed("User IP is required. Please try again!")
        if not _EMAIL.match(email):
            return failed("User email is not valid. Please try again!")
        if email.lower() != ACCOUNT_EMAIL:
            return failed(WRONG_EMAIL)
        if mode == "reject":
            return failed(REJECT_OPEN)
        box = p.get("box_auth_value") or ""
        if mode == "error" and not box:
            return failed(TRY_AGAIN_OPEN, status="failed")
        product = p.get("product") or ""
        subject, body = rewrite(product, p.get("subject") or "", p.get("body") or "")
        if not subject.strip():
            return failed("Subject is required!")
        mask = new_mask(lambda m: self.state.find(SYSTEM, m) is not None)
        number = str(self.state.next_id(SYSTEM))
        ticket = SimTicket(
            system=SYSTEM,
            id=mask,
            ref=mask,
            title=subject,
            requester=ACCOUNT_EMAIL,
            fields={
                "user_email": email,
                "user_ip": p.get("user_ip") or "",
                "product": product,
                "box_auth_value": box,
            },
            messages=[SimMessage(body=body, author=ACCOUNT_EMAIL)],
            internal={"ticket_id": number},
        )
        self.state.add_ticket(ticket)
        log.info("sim_open_ticket", extra={"fields": {"id": ticket.id}})
        if mode == "error":  # created, then the custom-field update failed (real server)
            return failed(TRY_AGAIN_ROOT_PASS, status="failed")
        return {
            "status": "success",
            "status_text": "created ticket successfully.",
            "ticket_reference_id": mask,
        }

    def _ticket(self, p: dict[str, str | None]) -> SimTicket | None:
        key = (p.get("ticketID") or "").strip()
        found = self.state.find(SYSTEM, key)
        if found is None and key.isdigit():  # Kayako also takes its numeric ticket id
            found = next(
                (
                    t
                    for t in self.state.tickets
                    if t.system == SYSTEM and str(t.internal.get("ticket_id", "")) == key
                ),
                None,
            )
        return found

    def ticket_post(self, p: dict[str, str | None], reject: bool) -> dict[str, Any]:
        ticket = None if reject else self._ticket(p)
        if ticket is None:
            return {"status": "Failed", "status_text": NO_TICKET}
        if not (p.get("content") or ""):
            return {"status": "Failed", "status_text": "Content is required"}
        ticket.messages.append(SimMessage(body=p.get("content") or "", author=ACCOUNT_EMAIL))
        ticket.status = "open"  # a customer's reply reopens a closed ticket
        ticket.internal["last_activity"] = time.time()
        return {"status": "Success", "status_text": "Post added successfully"}

    def view_ticket(self, p: dict[str, str | None], reject: bool) -> dict[str, Any]:
        ticket = None if reject else self._ticket(p)
        if ticket is None:
            return {"status": "Failed", "status_text": NO_TICKET}
        stamp = str(int(ticket.created_at))
        return {
            "status": "Success",
            "status_text": "Ticket details",
            "result": {
                "ticket_reference_id": ticket.ref,
                "full_name": ticket.requester,
                "email": ticket.requester,
                "subject": ticket.title,
                "creationtime": stamp,
                "statustitle": _statustitle(ticket),
                "prioritytitle": "Standard - 1 to 3 hour resolution",
                "lastactivity": str(int(_last_activity(ticket))),
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

    def ticket_list(self, p: dict[str, str | None], mode: str | None) -> dict[str, Any]:
        if mode == "reject":
            return {"status": "Failed", "status_text": REJECT_LIST, "totalPages": "0"}
        if mode == "error":
            return {"status": "failed", "status_text": TRY_AGAIN_LIST, "tickets": ""}
        # The server's `status` argument is ignored (its code is commented out): the list holds
        # the tickets in the open statuses, newest activity first.
        tickets = [t for t in self.state.tickets if t.system == SYSTEM and t.status != "closed"]
        tickets.sort(key=lambda t: (_last_activity(t), t.created_at), reverse=True)
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
                    "ticket_id": str(t.internal.get("ticket_id") or t.id),
                    "ticket_reference_id": t.ref,
                    "subject": t.title,
                    "lastreplier": t.messages[-1].author if t.messages else t.requester,
                    "statustitle": _statustitle(t),
                    "prioritytitle": "Standard - 1 to 3 hour resolution",
                    "replies": str(max(len(t.messages) - 1, 0)),
                    "lastactivity": str(int(_last_activity(t))),
                }
                for t in chunk
            ],
        }


def _last_activity(ticket: SimTicket) -> float:
    value = ticket.internal.get("last_activity")
    return float(value) if isinstance(value, int | float) else ticket.created_at


class Busy(Exception):
    """Answer with HTTP 503 (the server is busy)."""


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
        body = await request.read()
        try:
            op, params = parse_call(body)
            return response(op, sim.call(op, params, mode))
        except Busy:
            raise web.HTTPServiceUnavailable(text="Service temporarily unavailable") from None
        except SoapFault as exc:
            log.info("sim_fault", extra={"fields": {"code": exc.code, "text": exc.text}})
            return fault(exc.code, exc.text)

    app.router.add_get(PATH, get)
    app.router.add_post(PATH, post)
