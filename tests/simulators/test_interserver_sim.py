"""The InterServer SOAP simulator against reference clients: sync zeep (WSDL from `?wsdl`) and
hand-written XML (rpc/encoded with xsi:type, positional SOAP::Lite parameters)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
import zeep
from lxml import etree
from zeep.helpers import serialize_object

from gateway.simulators import interserver as sim
from gateway.simulators.server import Simulators
from gateway.simulators.state import ACCOUNT_EMAIL, PASSWORD

ENV = "http://schemas.xmlsoap.org/soap/envelope/"


@pytest.fixture
async def soap(sims: Simulators) -> zeep.Client:
    """The reference client: plain sync zeep, WSDL read from the simulator's `?wsdl`."""
    url = f"{sims.base_url}{sim.PATH}?wsdl"
    return await asyncio.to_thread(zeep.Client, url)


async def call(soap: zeep.Client, op: str, *args: Any) -> Any:
    """Run a sync zeep call in a thread (the simulator serves on this event loop)."""
    fn: Callable[..., Any] = soap.service[op]
    return serialize_object(await asyncio.to_thread(fn, *args), target_cls=dict)


async def fault(http: httpx.AsyncClient, system: str = "interserver", **body: Any) -> None:
    resp = await http.post("/_sim/fault", json={"system": system, **body})
    assert resp.status_code == 200, resp.text


async def raw(http: httpx.AsyncClient, xml: str) -> tuple[int, etree._Element]:
    resp = await http.post(sim.PATH, content=xml.encode(), headers={"Content-Type": "text/xml"})
    return resp.status_code, etree.fromstring(resp.content)


def ret(root: etree._Element) -> dict[str, str]:
    """Children of the `<return>` element by local name (text)."""
    el = next(e for e in root.iter() if etree.QName(e).localname == "return")
    return {etree.QName(c).localname: c.text or "" for c in el}


def return_text(root: etree._Element) -> str:
    return next(str(e.text or "") for e in root.iter() if etree.QName(e).localname == "return")


def faultstring(root: etree._Element) -> str:
    fault_el = root.find(f"{{{ENV}}}Body/{{{ENV}}}Fault")
    assert fault_el is not None, etree.tostring(root)
    return str(fault_el.findtext("faultstring"))


ENCODED_OPEN = """<?xml version="1.0" encoding="UTF-8"?>
<SOAP-ENV:Envelope xmlns:SOAP-ENV="http://schemas.xmlsoap.org/soap/envelope/"
  xmlns:SOAP-ENC="http://schemas.xmlsoap.org/soap/encoding/"
  xmlns:xsd="http://www.w3.org/2001/XMLSchema"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" xmlns:ns1="urn:myapi"
  SOAP-ENV:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/">
 <SOAP-ENV:Body>
  <ns1:api_openTicket>
   <sid xsi:type="xsd:string">{sid}</sid>
   <user_email xsi:type="xsd:string">{email}</user_email>
   <user_ip xsi:type="xsd:string">192.0.2.1</user_ip>
   <subject xsi:type="xsd:string">Raw &amp; encoded</subject>
   <product xsi:type="xsd:string">VPS</product>
   <body xsi:type="xsd:string">line one
line two</body>
   <box_auth_value xsi:nil="true"/>
  </ns1:api_openTicket>
 </SOAP-ENV:Body>
</SOAP-ENV:Envelope>"""

# SOAP::Lite without SOAP::Data->name sends generated parameter names.
GENSYM_LOGIN = """<?xml version="1.0"?>
<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"
  xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"
  xmlns:xsd="http://www.w3.org/2001/XMLSchema">
 <soap:Body><api_login xmlns="urn:myapi">
  <c-gensym3 xsi:type="xsd:string">{user}</c-gensym3>
  <c-gensym5 xsi:type="xsd:string">{password}</c-gensym5>
 </api_login></soap:Body></soap:Envelope>"""

LITERAL = """<soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"
  xmlns:ns="urn:myapi"><soap:Body><ns:{op}>{params}</ns:{op}></soap:Body></soap:Envelope>"""


def literal(op: str, **params: str) -> str:
    inner = "".join(f"<{k}>{v}</{k}>" for k, v in params.items())
    return LITERAL.format(op=op, params=inner)


async def login(soap: zeep.Client) -> str:
    sid = await call(soap, "api_login", ACCOUNT_EMAIL, PASSWORD)
    assert isinstance(sid, str) and len(sid) == 32
    return sid


# ---------------------------------------------------------------- WSDL


async def test_wsdl_names_the_requested_address(sims: Simulators, http: httpx.AsyncClient) -> None:
    resp = await http.get(sim.PATH, params={"wsdl": ""})
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/xml")
    root = etree.fromstring(resp.content)
    (addr,) = root.iter("{http://schemas.xmlsoap.org/wsdl/soap/}address")
    assert addr.get("location") == f"{sims.base_url}{sim.PATH}"
    ops = {el.get("name") for el in root.iter("{http://schemas.xmlsoap.org/wsdl/}operation")}
    assert {"api_login", "api_openTicket", "api_ticketPost", "api_viewTicket"} <= ops
    assert "api_getTicketList" in ops


async def test_get_without_wsdl_is_refused(http: httpx.AsyncClient) -> None:
    assert (await http.get(sim.PATH)).status_code == 400


# ---------------------------------------------------------------- zeep reference client


async def test_zeep_full_ticket_flow(soap: zeep.Client, http: httpx.AsyncClient) -> None:
    sid = await login(soap)
    opened = await call(
        soap, "api_openTicket", sid, ACCOUNT_EMAIL, "198.51.100.4", "Disk full", "VPS 12",
        "From: Bob <bob@example.org>\n\nmy disk is full", "",
    )  # fmt: skip
    assert opened["status"] == "success"  # the server's word for openTicket (api.php)
    assert opened["status_text"] == "created ticket successfully."
    ticket_id = opened["ticket_reference_id"]
    assert re.fullmatch(r"[A-Z]{3}-\d{3}-\d{5}", ticket_id)  # a Kayako mask

    posted = await call(soap, "api_ticketPost", sid, ticket_id, "second message")
    assert posted["status"] == "Success"

    viewed = await call(soap, "api_viewTicket", sid, ticket_id)
    assert viewed["status"] == "Success"
    detail = viewed["result"]
    assert detail["statustitle"] == "Open"
    assert detail["subject"] == "VPS 12 : Disk full"  # product rewrite: short subject
    assert [p["contents"] for p in detail["posts"]["item"]] == [
        "VPS 12\n\nFrom: Bob <bob@example.org>\n\nmy disk is full",
        "second message",
    ]

    listed = await call(soap, "api_getTicketList", sid, 1, 10, "")
    assert listed["status"] == "ok"
    assert [t["ticket_reference_id"] for t in listed["tickets"]["item"]] == [ticket_id]

    (ticket,) = (await http.get("/_sim/tickets", params={"system": "interserver"})).json()
    assert ticket["id"] == ticket["ref"] == str(ticket_id)
    assert ticket["title"] == "VPS 12 : Disk full"
    assert ticket["requester"] == ACCOUNT_EMAIL
    assert ticket["fields"] == {
        "user_email": ACCOUNT_EMAIL,
        "user_ip": "198.51.100.4",
        "product": "VPS 12",
        "box_auth_value": "",
    }
    assert [m["author"] for m in ticket["messages"]] == [ACCOUNT_EMAIL, ACCOUNT_EMAIL]
    assert ticket["messages"][1]["body"] == "second message"


async def test_login_with_wrong_password_gives_blank_session(soap: zeep.Client) -> None:
    assert await call(soap, "api_login", ACCOUNT_EMAIL, "wrong") in ("", None)
    assert await call(soap, "api_login", "other@example.com", PASSWORD) in ("", None)


async def test_open_ticket_with_other_email_fails(soap: zeep.Client) -> None:
    sid = await login(soap)
    res = await call(soap, "api_openTicket", sid, "x@example.com", "192.0.2.1", "s", "", "b", "")
    assert res == {
        "status": "Failed",
        "status_text": "Invalid Email Address - Does not match your account email!",
        "ticket_reference_id": "-1",
    }


async def test_open_ticket_needs_a_user_ip(soap: zeep.Client, http: httpx.AsyncClient) -> None:
    sid = await login(soap)
    res = await call(soap, "api_openTicket", sid, ACCOUNT_EMAIL, "", "s", "", "b", "")
    assert res["status"] == "Failed"
    assert res["status_text"] == "User IP is required. Please try again!"
    assert (await http.get("/_sim/tickets")).json() == []


async def test_product_rewrite_keeps_long_subjects(soap: zeep.Client) -> None:
    sid = await login(soap)
    long_subject = "A subject of thirty characters"
    assert len(long_subject) == 30
    res = await call(
        soap, "api_openTicket", sid, ACCOUNT_EMAIL, "192.0.2.1", long_subject, "VPS", "b", ""
    )
    viewed = await call(soap, "api_viewTicket", sid, res["ticket_reference_id"])
    assert viewed["result"]["subject"] == long_subject
    assert viewed["result"]["posts"]["item"][0]["contents"] == "VPS\n\nb"
    # the numeric Kayako id names the same ticket
    listed = await call(soap, "api_getTicketList", sid, 1, 10, "")
    (item,) = listed["tickets"]["item"]
    assert item["ticket_reference_id"] == res["ticket_reference_id"]
    by_number = await call(soap, "api_viewTicket", sid, item["ticket_id"])
    assert by_number["result"]["ticket_reference_id"] == res["ticket_reference_id"]


async def test_open_ticket_needs_a_subject(soap: zeep.Client) -> None:
    sid = await login(soap)
    res = await call(soap, "api_openTicket", sid, ACCOUNT_EMAIL, "192.0.2.1", " ", "", "b", "")
    assert res["status"] == "Failed"


async def test_unknown_ticket(soap: zeep.Client) -> None:
    sid = await login(soap)
    for op, args in (("api_ticketPost", ("99999", "hi")), ("api_viewTicket", ("99999",))):
        res = await call(soap, op, sid, *args)
        assert res["status"] == "Failed"
        assert res["status_text"] == "Error loading ticket details!"


async def test_expired_session_is_a_fault(soap: zeep.Client, http: httpx.AsyncClient) -> None:
    sid = await login(soap)
    assert (await call(soap, "api_getTicketList", sid, 1, 10, ""))["status"] == "ok"
    await http.post("/_sim/sessions/expire")
    with pytest.raises(zeep.exceptions.Fault) as err:
        await call(soap, "api_getTicketList", sid, 1, 10, "")
    assert err.value.message == sim.INVALID_SESSION
    new_sid = await login(soap)
    assert (await call(soap, "api_getTicketList", new_sid, 1, 10, ""))["status"] == "ok"


async def test_reset_voids_sessions(soap: zeep.Client, http: httpx.AsyncClient) -> None:
    sid = await login(soap)
    await http.post("/_sim/reset")
    with pytest.raises(zeep.exceptions.Fault):
        await call(soap, "api_viewTicket", sid, "1")


async def test_ticket_list_pages_and_order(soap: zeep.Client, http: httpx.AsyncClient) -> None:
    masks = []
    for n in range(6):
        body = {"system": "interserver", "title": f"T{n}", "requester": "c@example.org"}
        resp = await http.post("/_sim/tickets", json=body)
        assert resp.status_code == 201
        masks.append(resp.json()["id"])
        await asyncio.sleep(0.01)
    assert all(re.fullmatch(r"[A-Z]{3}-\d{3}-\d{5}", m) for m in masks)
    await http.post(f"/_sim/tickets/interserver/{masks[0]}/close")
    sid = await login(soap)
    page1 = await call(soap, "api_getTicketList", sid, 1, 2, "")
    page3 = await call(soap, "api_getTicketList", sid, 3, 2, "")
    assert page1["totalPages"] == "2.5"  # closed tickets are not listed; unrounded quotient
    assert len(page1["tickets"]["item"]) == 2
    assert len(page3["tickets"]["item"]) == 1
    # the status argument is ignored, as on the real server
    closed = await call(soap, "api_getTicketList", sid, 1, 10, "closed")
    listed = [t["ticket_reference_id"] for t in closed["tickets"]["item"]]
    assert listed == masks[:0:-1]  # newest activity first
    # a reply is activity, and it reopens a closed ticket
    await call(soap, "api_ticketPost", sid, masks[0], "any news?")
    await call(soap, "api_ticketPost", sid, masks[2], "me too")
    viewed = await call(soap, "api_viewTicket", sid, masks[0])
    assert viewed["result"]["statustitle"] == "Open"
    again = await call(soap, "api_getTicketList", sid, 1, 10, "")
    assert [t["ticket_reference_id"] for t in again["tickets"]["item"]][:2] == [
        masks[2],
        masks[0],
    ]


# ---------------------------------------------------------------- hand-written XML


async def test_raw_encoded_request(http: httpx.AsyncClient) -> None:
    status, root = await raw(http, GENSYM_LOGIN.format(user=ACCOUNT_EMAIL, password=PASSWORD))
    assert status == 200
    sid = return_text(root)
    assert len(sid) == 32
    status, root = await raw(http, ENCODED_OPEN.format(sid=sid, email=ACCOUNT_EMAIL))
    assert status == 200
    body = root.find(f"{{{ENV}}}Body")
    assert body is not None
    assert etree.QName(body[0]).localname == "api_openTicketResponse"
    assert etree.QName(body[0]).namespace == "urn:myapi"
    res = ret(root)
    assert res["status"] == "success"
    tickets = (await http.get("/_sim/tickets")).json()
    assert tickets[0]["id"] == res["ticket_reference_id"]
    assert tickets[0]["title"] == "VPS : Raw & encoded"
    assert tickets[0]["messages"][0]["body"] == "VPS\n\nline one\nline two"
    assert tickets[0]["fields"]["box_auth_value"] == ""


async def test_raw_wrong_email(http: httpx.AsyncClient) -> None:
    _, root = await raw(http, GENSYM_LOGIN.format(user=ACCOUNT_EMAIL, password=PASSWORD))
    sid = return_text(root)
    _, root = await raw(http, ENCODED_OPEN.format(sid=sid, email="nobody@example.com"))
    assert ret(root) == {
        "status": "Failed",
        "status_text": sim.WRONG_EMAIL,
        "ticket_reference_id": "-1",
    }


async def test_raw_bad_session_and_garbage(http: httpx.AsyncClient) -> None:
    status, root = await raw(http, literal("api_viewTicket", sid="nope", ticketID="1"))
    assert status == 500
    assert faultstring(root) == sim.INVALID_SESSION
    status, root = await raw(http, "<not-xml")
    assert status == 500
    assert faultstring(root).startswith("Bad Request")
    status, root = await raw(http, literal("api_deleteEverything", sid="x"))
    assert status == 500
    assert "not present" in faultstring(root)


# ---------------------------------------------------------------- faults


async def test_fault_error_is_503(http: httpx.AsyncClient) -> None:
    await fault(http, mode="error", count=1)
    resp = await http.post(sim.PATH, content=literal("api_login", username="a", password="b"))
    assert resp.status_code == 503
    resp = await http.post(sim.PATH, content=literal("api_login", username="a", password="b"))
    assert resp.status_code == 200


async def test_fault_error_is_kayakos_lowercase_failed(
    soap: zeep.Client, http: httpx.AsyncClient
) -> None:
    sid = await login(soap)
    await fault(http, mode="error", count=2)
    res = await call(soap, "api_openTicket", sid, ACCOUNT_EMAIL, "192.0.2.1", "s", "", "b", "")
    assert res["status"] == "failed"  # lowercase: Kayako's own failure
    assert res["status_text"].endswith("Please try again!")
    listed = await call(soap, "api_getTicketList", sid, 1, 10, "")
    assert listed["status"] == "failed"
    assert (await http.get("/_sim/tickets")).json() == []  # nothing was created


async def test_fault_error_with_box_auth_value_fails_after_creating(
    soap: zeep.Client, http: httpx.AsyncClient
) -> None:
    sid = await login(soap)
    await fault(http, mode="error", count=1)
    res = await call(
        soap, "api_openTicket", sid, ACCOUNT_EMAIL, "192.0.2.1", "s", "", "b", "root-secret"
    )
    assert res["status"] == "failed"
    assert "root/admin pass" in res["status_text"]
    assert str(res["ticket_reference_id"]) == "-1"
    (ticket,) = (await http.get("/_sim/tickets")).json()  # ... but the ticket exists
    assert ticket["title"] == "s"


async def test_fault_reject_is_a_business_failure(
    soap: zeep.Client, http: httpx.AsyncClient
) -> None:
    sid = await login(soap)
    await fault(http, mode="reject")
    res = await call(soap, "api_openTicket", sid, ACCOUNT_EMAIL, "192.0.2.1", "s", "", "b", "")
    assert res["status"] == "Failed"
    assert res["status_text"] == sim.REJECT_OPEN
    assert str(res["ticket_reference_id"]) == "-1"
    res = await call(soap, "api_ticketPost", sid, "1001", "x")
    assert res["status"] == "Failed"
    await fault(http, mode="ok")
    res = await call(soap, "api_openTicket", sid, ACCOUNT_EMAIL, "192.0.2.1", "s", "", "b", "")
    assert res["status"] == "success"


async def test_fault_auth(soap: zeep.Client, http: httpx.AsyncClient) -> None:
    sid = await login(soap)
    await fault(http, mode="auth")
    assert await call(soap, "api_login", ACCOUNT_EMAIL, PASSWORD) in ("", None)
    with pytest.raises(zeep.exceptions.Fault):
        await call(soap, "api_getTicketList", sid, 1, 10, "")
    await fault(http, mode="ok")
    assert (await call(soap, "api_getTicketList", await login(soap), 1, 10, ""))["status"] == "ok"


async def test_fault_down_drops_the_connection(http: httpx.AsyncClient) -> None:
    await fault(http, mode="down", count=1)
    with pytest.raises(httpx.TransportError):
        await http.post(sim.PATH, content=literal("api_login", username="a", password="b"))


def test_parse_call_positional_and_href() -> None:
    xml = b"""<e:Envelope xmlns:e="http://schemas.xmlsoap.org/soap/envelope/"><e:Body>
      <m:api_ticketPost xmlns:m="urn:myapi"><a>S</a><b href="#r1"/><c>hello</c></m:api_ticketPost>
      <multiRef id="r1">77</multiRef></e:Body></e:Envelope>"""
    op, params = sim.parse_call(xml)
    assert op == "api_ticketPost"
    assert params == {"sid": "S", "ticketID": "77", "content": "hello"}
