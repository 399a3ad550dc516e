"""The SuperOffice customer-port simulator, driven by zeep (the reference client) and by raw XML."""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zeep
from aiohttp import web
from zeep.transports import AsyncTransport

from gateway.simulators.server import build_app
from gateway.simulators.state import ACCOUNT_EMAIL, PASSWORD, SimState
from gateway.simulators.superoffice_soap import PATH, SIM_KEY, CustomerPortSim

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"


class Sim:
    """A running simulator app on loopback plus clients for it."""

    def __init__(self, base: str, state: SimState, port_sim: CustomerPortSim) -> None:
        self.base = base
        self.url = base + PATH
        self.state = state
        self.port_sim = port_sim
        self.http = httpx.AsyncClient(timeout=10)
        self.service: Any = None

    async def raw(self, body: str, *, method: str = "POST") -> httpx.Response:
        return await self.http.request(
            method, self.url, content=body.encode(), headers={"Content-Type": "text/xml"}
        )

    async def login(self) -> str:
        r = await self.service.login(ACCOUNT_EMAIL, PASSWORD)
        assert r["errorCode"] == "0"
        return str(r["sessionKey"])

    async def fault(self, mode: str, **extra: Any) -> None:
        r = await self.http.post(
            self.base + "/_sim/fault", json={"system": "superoffice-soap", "mode": mode, **extra}
        )
        r.raise_for_status()


@pytest.fixture
async def sim(tmp_path: Path) -> AsyncIterator[Sim]:
    state = SimState()
    app = build_app(state)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    s = Sim(f"http://127.0.0.1:{port}", state, app[SIM_KEY])
    # The reference client loads the WSDL the simulator serves (fetched asynchronously here:
    # zeep reads WSDLs synchronously, which would block this very event loop).
    wsdl = await s.http.get(s.url + "?wsdl")
    assert wsdl.status_code == 200
    (tmp_path / "customer.wsdl").write_bytes(wsdl.content)
    transport = AsyncTransport(client=httpx.AsyncClient(timeout=10))
    client = zeep.AsyncClient(str(tmp_path / "customer.wsdl"), transport=transport)
    s.service = client.bind()  # the served soap:address must point at this very server
    try:
        yield s
    finally:
        await transport.aclose()
        await s.http.aclose()
        await runner.cleanup()


async def test_wsdl_address_is_rewritten(sim: Sim) -> None:
    r = await sim.http.get(sim.url, params={"wsdl": ""})
    assert r.headers["content-type"].startswith("text/xml")
    assert f'<soap:address location="{sim.url}"/>' in r.text
    assert "urn:superoffice:cs:customer" in r.text


async def test_login_checks_credentials(sim: Sim) -> None:
    bad = await sim.service.login(ACCOUNT_EMAIL, "wrong")
    assert bad["errorCode"] == "1"
    assert not bad["sessionKey"]
    other = await sim.service.login("someone@example.com", PASSWORD)
    assert other["errorCode"] == "1"
    key = await sim.login()
    assert re.fullmatch(r"[0-9a-f]{32}", key)
    assert await sim.login() != key


async def test_new_ticket_records_fields(sim: Sim) -> None:
    key = await sim.login()
    extra = {
        "item": [{"field": "x_1", "value": "alice@example.org"}, {"field": "x_3", "value": ""}]
    }
    r = await sim.service.newTicket(key, "Printer on fire", "2", "3", "-1", extra)
    assert r["errorCode"] == "0"
    [t] = sim.state.tickets
    assert (t.system, t.id, t.ref, t.title) == (
        "superoffice-soap",
        r["ticketId"],
        t.id,
        "Printer on fire",
    )
    assert t.requester == ACCOUNT_EMAIL
    assert t.fields == {
        "categoryId": 3,
        "priorityId": -1,
        "sLevel": 2,
        "extraField": {"x_1": "alice@example.org", "x_3": ""},
    }
    assert t.messages == []  # newTicket has no body


@pytest.mark.parametrize(
    ("slevel", "category", "priority", "extra", "code", "text"),
    [
        ("3", "1", "1", [], "10", "security level"),
        ("2", "4", "1", [], "8", "category"),  # internal category
        ("2", "99", "1", [], "8", "category"),
        ("2", "x", "1", [], "8", "category"),
        ("2", "1", "4", [], "9", "priority"),  # internal priority
        ("2", "1", "0", [], "9", "priority"),
        ("2", "1", "1", [{"field": "x_9", "value": "v"}], "12", "extra field"),
        ("2", "1", "1", [{"field": "customer.x_1", "value": "v"}], "12", "extra field"),
    ],
)
async def test_new_ticket_refusals_and_error_message(
    sim: Sim, slevel: str, category: str, priority: str, extra: list[Any], code: str, text: str
) -> None:
    key = await sim.login()
    r = await sim.service.newTicket(key, "t", slevel, category, priority, {"item": extra})
    assert r["errorCode"] == code
    assert text in (await sim.service.getErrorMessage(key)).lower()
    assert sim.state.tickets == []


async def test_categories_and_priorities_are_the_external_ones(sim: Sim) -> None:
    cats = await sim.service.getCategories("")  # the session key may be empty here
    assert cats["errorCode"] == "0"
    assert [(c["id"], c["name"], c["parentId"]) for c in cats["categoryIds"]["item"]] == [
        ("1", "Support", "-1"),
        ("2", "Sales", "-1"),
        ("3", "Billing", "-1"),
    ]
    assert (await sim.service.getPriorities("nonsense"))["errorCode"] == "5"
    prios = await sim.service.getPriorities(await sim.login())
    assert [(p["id"], p["name"]) for p in prios["priorities"]["item"]] == [
        ("1", "Low"),
        ("2", "Medium"),
        ("3", "High"),
    ]


async def test_messages_attachments_and_get_ticket(sim: Sim) -> None:
    key = await sim.login()
    tid = (await sim.service.newTicket(key, "Hello", "2", "1", "-1", {"item": []}))["ticketId"]
    data = base64.b64encode(b"%PDF-1.4 hello").decode()
    att = await sim.service.addAttachment(key, "report.pdf", "application/pdf", data)
    assert att["errorCode"] == "0"
    bad = await sim.service.addAttachment(key, "x.bin", "application/octet-stream", "not base64!")
    assert bad["errorCode"] == "16"

    r = await sim.service.addMessage(
        key, "line 1\nline 2", tid, "2", {"item": [att["attachmentId"]]}
    )
    assert r["errorCode"] == "0" and r["messageId"]
    assert (await sim.service.addMessage(key, "b", tid, "2", {"item": ["777"]}))[
        "errorCode"
    ] == "16"
    assert (await sim.service.addMessage(key, "b", tid, "0", {"item": []}))["errorCode"] == "10"
    assert (await sim.service.addMessage(key, "b", "424242", "2", {"item": []}))[
        "errorCode"
    ] == "13"
    assert "unknown ticket" in (await sim.service.getErrorMessage(key)).lower()

    [t] = sim.state.tickets
    assert [(m.body, m.author, m.attachments) for m in t.messages] == [
        ("line 1\nline 2", ACCOUNT_EMAIL, ["report.pdf"])
    ]

    fields = ["ticket.id", "no.such.field", "ticket.status", "ticket.priority", "ticket.x_1"]
    g = await sim.service.getTicket(key, tid, {"item": fields})
    assert g["errorCode"] == "0"
    got = {i["field"]: i["value"] or "" for i in g["ticketResult"]["item"]}
    assert got == {
        "ticket.id": tid,
        "ticket.status": "1",  # numeric, as in the real system: 1 active
        "ticket.priority": "2",  # -1: the system decided
        "ticket.x_1": "",
    }
    assert g["messageIds"]["item"] == [r["messageId"]]
    assert (await sim.service.getTicket(key, "424242", {"item": fields}))["errorCode"] == "13"


async def test_closed_ticket_is_reopened_by_a_customer_message(sim: Sim) -> None:
    key = await sim.login()
    tid = (await sim.service.newTicket(key, "Hello", "2", "1", "1", {"item": []}))["ticketId"]
    await sim.http.post(f"{sim.base}/_sim/tickets/superoffice-soap/{tid}/close")
    g = await sim.service.getTicket(key, tid, {"item": ["ticket.status"]})
    assert g["ticketResult"]["item"][0]["value"] == "2"  # closed
    assert (await sim.service.addMessage(key, "again", tid, "2", {"item": []}))["errorCode"] == "0"
    g = await sim.service.getTicket(key, tid, {"item": ["ticket.status"]})
    assert g["ticketResult"]["item"][0]["value"] == "1"  # active again


async def test_ticket_made_over_sim_api_belongs_to_the_account(sim: Sim) -> None:
    r = await sim.http.post(
        sim.base + "/_sim/tickets",
        json={"system": "superoffice-soap", "id": "555", "title": "old", "requester": "bob@x.org"},
    )
    assert r.status_code == 201
    key = await sim.login()
    assert (await sim.service.addMessage(key, "more", "555", "2", {"item": []}))["errorCode"] == "0"
    # the next ticket made over SOAP skips ids already taken
    tid = (await sim.service.newTicket(key, "new", "2", "1", "1", {"item": []}))["ticketId"]
    assert tid != "555"


async def test_internal_ticket_is_not_visible_to_get_ticket(sim: Sim) -> None:
    key = await sim.login()
    tid = (await sim.service.newTicket(key, "Hush", "1", "1", "1", {"item": []}))["ticketId"]
    assert (await sim.service.getTicket(key, tid, {"item": ["ticket.id"]}))["errorCode"] == "13"


async def test_session_expiry_by_epoch_and_idle_time(sim: Sim) -> None:
    key = await sim.login()
    assert (await sim.service.getPriorities(key))["errorCode"] == "0"
    r = await sim.http.post(sim.base + "/_sim/sessions/expire")
    assert r.status_code == 200
    assert (await sim.service.getPriorities(key))["errorCode"] == "5"
    assert (await sim.service.newTicket(key, "t", "2", "1", "1", {"item": []}))["errorCode"] == "5"

    key = await sim.login()
    sim.port_sim.session_idle = 0.0  # every pause is now longer than the idle limit
    assert (await sim.service.getPriorities(key))["errorCode"] == "5"
    sim.port_sim.session_idle = 3600.0
    key = await sim.login()
    assert await sim.service.logout(key) == "0"  # a single out part comes back bare
    assert (await sim.service.getPriorities(key))["errorCode"] == "5"


async def test_fault_error_is_http_503(sim: Sim) -> None:
    await sim.fault("error", count=1)
    r = await sim.raw(_envelope("<tns:getCategories><sessionKey/></tns:getCategories>"))
    assert r.status_code == 503
    r = await sim.raw(_envelope("<tns:getCategories><sessionKey/></tns:getCategories>"))
    assert r.status_code == 200


async def test_fault_reject_is_the_calls_business_error(sim: Sim) -> None:
    key = await sim.login()
    tid = (await sim.service.newTicket(key, "t", "2", "1", "1", {"item": []}))["ticketId"]
    await sim.fault("reject", count=1)
    assert (await sim.service.newTicket(key, "t", "2", "1", "1", {"item": []}))["errorCode"] == "8"
    assert await sim.service.getErrorMessage(key) == "Invalid category (simulated rejection)"
    await sim.fault("reject", count=1)
    assert (await sim.service.addMessage(key, "b", tid, "2", {"item": []}))["errorCode"] == "13"
    assert len(sim.state.tickets) == 1 and sim.state.tickets[0].messages == []


async def test_fault_auth_refuses_login_and_sessions(sim: Sim) -> None:
    key = await sim.login()
    await sim.fault("auth")
    assert (await sim.service.getPriorities(key))["errorCode"] == "5"
    assert (await sim.service.login(ACCOUNT_EMAIL, PASSWORD))["errorCode"] == "1"
    await sim.fault("ok")
    assert (await sim.service.getPriorities(key))["errorCode"] == "5"  # that session is gone
    assert (await sim.service.getPriorities(await sim.login()))["errorCode"] == "0"


async def test_fault_down_drops_the_connection(sim: Sim) -> None:
    await sim.fault("down", count=1)
    with pytest.raises(httpx.TransportError):
        await sim.raw(_envelope("<tns:getCategories><sessionKey/></tns:getCategories>"))


def _envelope(body: str, *, env: str = SOAP_ENV) -> str:
    return (
        f'<?xml version="1.0"?><s:Envelope xmlns:s="{env}" xmlns:tns="urn:superoffice:cs:customer"'
        ' xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"'
        ' xmlns:xsd="http://www.w3.org/2001/XMLSchema">'
        f"<s:Header/><s:Body>{body}</s:Body></s:Envelope>"
    )


async def test_raw_request_is_read_leniently(sim: Sim) -> None:
    # Another namespace on the operation, qualified and xsi:typed parameters, arbitrary item names.
    login = (
        '<m:login xmlns:m="urn:something:else">'
        f'<m:username xsi:type="xsd:string">{ACCOUNT_EMAIL}</m:username>'
        f"<password>{PASSWORD}</password></m:login>"
    )
    r = await sim.raw(_envelope(login, env="http://www.w3.org/2003/05/soap-envelope"))
    assert r.status_code == 200
    key = re.search(r"<sessionKey>([0-9a-f]+)</sessionKey>", r.text)
    assert key, r.text
    assert "<errorCode>0</errorCode>" in r.text
    new = (
        f"<tns:newTicket><sessionKey>{key.group(1)}</sessionKey><title>Hi &amp; bye</title>"
        "<sLevel> 2 </sLevel><categoryId>2</categoryId><priorityId>-1</priorityId>"
        '<extraField xsi:type="tns:ArrayOfValuePairStruct"><pair><value>v5</value>'
        "<field>x_5</field></pair></extraField></tns:newTicket>"
    )
    r = await sim.raw(_envelope(new))
    assert r.status_code == 200
    assert re.search(
        r"<tns:newTicketResponse><errorCode>0</errorCode><ticketId>\d+</ticketId>", r.text
    )
    [t] = sim.state.tickets
    assert t.title == "Hi & bye" and t.fields["extraField"] == {"x_5": "v5"}


@pytest.mark.parametrize(
    ("method", "body"),
    [
        ("POST", "this is not xml"),
        ("POST", "<a><b/></a>"),  # not an envelope
        ("POST", _envelope("")),  # empty body
        ("POST", _envelope("<tns:deleteEverything/>")),  # unknown operation
        ("GET", ""),  # GET without ?wsdl
        ("PUT", _envelope("<tns:getCategories/>")),
    ],
)
async def test_bad_requests_get_a_soap_fault(sim: Sim, method: str, body: str) -> None:
    r = await sim.raw(body, method=method)
    assert r.status_code == 500
    assert "Fault>" in r.text and "<faultcode>SOAP-ENV:Client</faultcode>" in r.text


# -- the installation-style endpoint (/superoffice/soap/customer-alt) ----------------------------

ALT_NS = "urn:ejournal:customer-service"
ALT_REQUEST = """<?xml version="1.0"?>
<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"><e:Body>
<n:{op} xmlns:n="urn:ejournal:customer-service">{params}</n:{op}></e:Body></e:Envelope>"""


async def alt(sim: Sim, op: str, **params: str) -> Any:
    from lxml import etree

    inner = "".join(f"<{k}>{v}</{k}>" for k, v in params.items())
    r = await sim.http.post(
        sim.base + "/superoffice/soap/customer-alt",
        content=ALT_REQUEST.format(op=op, params=inner).encode(),
        headers={"Content-Type": "text/xml"},
    )
    assert r.status_code == 200, r.text
    root = etree.fromstring(r.content)
    resp = root[0][0]
    assert etree.QName(resp).namespace == ALT_NS and etree.QName(resp).localname == f"{op}Response"
    return resp


async def test_alt_endpoint_wsdl_names_itself_and_differs(sim: Sim) -> None:
    r = await sim.http.get(sim.base + "/superoffice/soap/customer-alt?wsdl")
    assert r.status_code == 200
    assert f'location="{sim.base}/superoffice/soap/customer-alt"'.encode() in r.content
    assert ALT_NS.encode() in r.content and b"SOAP-ENC:Array" in r.content
    assert b"errorCode" not in r.content and b"sessionKey" not in r.content


async def test_alt_endpoint_answers_encoded_with_its_own_part_names(sim: Sim) -> None:
    xsi = "{http://www.w3.org/2001/XMLSchema-instance}type"
    login = await alt(sim, "login", user=ACCOUNT_EMAIL, **{"pass": PASSWORD})
    assert [c.tag for c in login] == ["result", "key"]
    assert login[0].text == "0" and login[0].get(xsi) == "xsd:string"
    key = login[1].text
    made = await alt(
        sim, "newTicket", key=key, subject="Alt", securityLevel="2", category="1", priority="-1",
        extraFields="<item><field>x_2</field><value>v</value></item>",
    )  # fmt: skip
    assert [c.tag for c in made] == ["result", "id"] and made[0].text == "0"
    tid = made[1].text
    # the tickets are the same as on the first endpoint
    [t] = sim.state.tickets
    assert t.id == tid and t.fields["extraField"] == {"x_2": "v"}
    await sim.http.post(f"{sim.base}/_sim/tickets/superoffice-soap/{tid}/close")
    got = await alt(sim, "getTicket", key=key, ticket=tid, fields="<item>ticket.status</item>")
    values, messages = got[1], got[2]
    assert values.get(xsi) == "SOAP-ENC:Array"
    assert (
        values.get("{http://schemas.xmlsoap.org/soap/encoding/}arrayType") == "ns:ResultStruct[1]"
    )
    assert [(i.findtext("field"), i.findtext("value")) for i in values] == [("ticket.status", "2")]
    assert messages.get("{http://schemas.xmlsoap.org/soap/encoding/}arrayType") == "xsd:int[0]"
    bad = await alt(sim, "addMessage", key=key, body="x", ticket="999", securityLevel="2")
    assert bad[0].text == "13"
    text = await alt(sim, "getErrorMessage", key=key)
    assert [c.tag for c in text] == ["text"] and "unknown ticket" in (text[0].text or "").lower()
