"""The WHMCS simulator against a plain HTTP client (httpx): contract behaviour and faults."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import httpx
import pytest

from gateway.simulators import whmcs as sim
from gateway.simulators.server import Simulators

AUTH = {"identifier": sim.IDENTIFIER, "secret": sim.SECRET, "responsetype": "json"}


async def api(http: httpx.AsyncClient, action: str, **params: Any) -> httpx.Response:
    form = {**AUTH, "action": action, **{k: str(v) for k, v in params.items()}}
    return await http.post(sim.PATH, data=form)


async def ok(http: httpx.AsyncClient, action: str, **params: Any) -> dict[str, Any]:
    resp = await api(http, action, **params)
    assert resp.status_code == 200, resp.text
    data = resp.json()
    assert data["result"] == "success", data
    return dict(data)


async def error(http: httpx.AsyncClient, action: str, **params: Any) -> tuple[int, str]:
    resp = await api(http, action, **params)
    data = resp.json()
    assert data["result"] == "error", data
    return resp.status_code, str(data["message"])


def b64(text: str | bytes) -> str:
    raw = text.encode() if isinstance(text, str) else text
    return base64.b64encode(raw).decode()


async def open_guest(http: httpx.AsyncClient, **extra: Any) -> dict[str, Any]:
    params: dict[str, Any] = {
        "deptid": 1,
        "subject": "Printer broken",
        "message": "It smokes.",
        "name": "Jane Doe",
        "email": "jane@example.org",
        "priority": "High",
        "noemail": 1,
    }
    params.update(extra)
    return await ok(http, "OpenTicket", **params)


async def tickets(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    resp = await http.get("/_sim/tickets", params={"system": "whmcs"})
    return list(resp.json())


async def test_open_ticket_returns_internal_id_and_public_tid(http: httpx.AsyncClient) -> None:
    data = await open_guest(http)
    assert data["id"] != data["tid"]
    assert isinstance(data["id"], str) and data["id"].isdigit()  # numbers come as strings
    assert len(data["tid"]) == 10 and data["tid"][3] == "-" and data["tid"][4:].isdigit()
    assert data["c"]
    [t] = await tickets(http)
    assert (t["id"], t["ref"], t["title"]) == (data["id"], data["tid"], "Printer broken")
    assert t["requester"] == "jane@example.org"
    assert t["fields"]["deptid"] == "1"
    assert t["fields"]["priority"] == "High"
    assert t["fields"]["noemail"] is True
    assert t["fields"]["name"] == "Jane Doe"
    assert t["messages"][0]["body"] == "It smokes."


async def test_customfields_and_attachments_are_decoded(http: httpx.AsyncClient) -> None:
    # The contract's example (string key) and what PHP really writes (integer key), UTF-8 lengths.
    custom = b64('a:2:{s:1:"1";s:6:"Google";i:7;s:7:"Zürich";}'.encode())
    files = b64(json.dumps([{"name": "log.txt", "data": b64(b"hello")}]))
    await open_guest(http, customfields=custom, attachments=files)
    [t] = await tickets(http)
    assert t["fields"]["customfields"] == {"1": "Google", "7": "Zürich"}
    assert t["fields"]["attachments"] == [{"name": "log.txt", "size": 5}]
    assert t["messages"][0]["attachments"] == ["log.txt"]


async def test_bad_attachment_encoding_is_an_error(http: httpx.AsyncClient) -> None:
    status, message = await error(
        http,
        "OpenTicket",
        deptid=1,
        subject="s",
        message="m",
        name="n",
        email="n@example.org",
        attachments="not base64!",
    )
    assert status == 200 and message.startswith("Invalid attachments")


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"deptid": 99}, "Department ID not found"),
        ({"subject": ""}, "Subject is required"),
        ({"message": ""}, "Message is required"),
        ({"name": ""}, "Name and email address are required if not a client"),
        ({"email": "not-an-address"}, "Email Address Invalid"),
        ({"clientid": 4242}, "Client ID Not Found"),
        ({"serviceid": 5}, "Service ID Not Found"),  # a guest has no services
    ],
)
async def test_open_ticket_business_errors(
    http: httpx.AsyncClient, params: dict[str, Any], message: str
) -> None:
    base: dict[str, Any] = {
        "deptid": 1,
        "subject": "s",
        "message": "m",
        "name": "n",
        "email": "n@example.org",
    }
    base.update(params)
    status, got = await error(http, "OpenTicket", **base)
    assert (status, got) == (200, message)


async def test_unknown_priority_falls_back_to_low(http: httpx.AsyncClient) -> None:
    await open_guest(http, priority="Urgent")
    [t] = await tickets(http)
    assert t["fields"]["priority"] == "Low"


async def test_ticket_for_a_client_with_service(sims: Simulators, http: httpx.AsyncClient) -> None:
    await http.post(
        "/_sim/clients",
        json={"system": "whmcs", "email": "bob@example.org", "id": "7", "name": "Bob Roe"},
    )
    data = await ok(
        http,
        "OpenTicket",
        deptid=2,
        subject="Invoice",
        message="Wrong total",
        clientid=7,
        serviceid=3,
        noemail=1,
    )
    [t] = await tickets(http)
    assert t["requester"] == "bob@example.org"
    assert t["fields"]["clientid"] == "7" and t["fields"]["serviceid"] == "3"
    got = await ok(http, "GetTicket", ticketid=data["id"])
    assert (got["userid"], got["email"], got["name"]) == ("7", "bob@example.org", "Bob Roe")
    assert got["deptname"] == "Billing" and got["service"] == "S3"


async def test_without_noemail_whmcs_sends_its_own_confirmation(
    sims: Simulators, http: httpx.AsyncClient
) -> None:
    data = await open_guest(http, noemail=0)
    outbox = (await http.get("/_sim/outbox")).json()
    assert len(outbox) == 1
    assert outbox[0]["rcpt_tos"] == ["jane@example.org"]
    assert f"[Ticket ID: {data['tid']}]" in outbox[0]["subject"]
    await open_guest(http)  # noemail=1: nothing more
    assert len((await http.get("/_sim/outbox")).json()) == 1


async def test_reply_takes_the_internal_id_only(http: httpx.AsyncClient) -> None:
    data = await open_guest(http)
    _status, message = await error(
        http, "AddTicketReply", ticketid=data["tid"], message="x", name="J", email="j@example.org"
    )
    assert message == "Ticket ID Not Found"
    await ok(
        http,
        "AddTicketReply",
        ticketid=data["id"],
        message="More info",
        name="Jane Doe",
        email="jane@example.org",
        attachments=b64(json.dumps([{"name": "a.png", "data": b64(b"png")}])),
    )
    got = await ok(http, "GetTicket", ticketnum=data["tid"])
    assert got["ticketid"] == data["id"] and got["tid"] == data["tid"]
    assert got["status"] == "Customer-Reply"
    replies = got["replies"]["reply"]
    assert [r["message"] for r in replies] == ["It smokes.", "More info"]
    assert replies[1]["attachment"] == "a.png"
    _, message = await error(http, "AddTicketReply", ticketid=data["id"], message="x")
    assert message == "Name and email address are required if not a client"
    _, message = await error(http, "GetTicket", ticketid=999999)
    assert message == "Ticket ID Not Found"


async def test_closed_status_and_reopen_by_reply(http: httpx.AsyncClient) -> None:
    data = await open_guest(http)
    assert (await ok(http, "GetTicket", ticketid=data["id"]))["status"] == "Open"
    await http.post(f"/_sim/tickets/whmcs/{data['id']}/close")
    assert (await ok(http, "GetTicket", ticketid=data["id"]))["status"] == "Closed"
    await ok(
        http,
        "AddTicketReply",
        ticketid=data["id"],
        message="again",
        name="J",
        email="jane@example.org",
    )
    assert (await ok(http, "GetTicket", ticketid=data["id"]))["status"] == "Customer-Reply"


async def test_get_tickets_filters(http: httpx.AsyncClient) -> None:
    first = await open_guest(http, subject="Printer broken")
    await open_guest(http, subject="Other thing")
    await open_guest(http, subject="Printer broken", email="other@example.org")
    got = await ok(http, "GetTickets", email="jane@example.org", subject="printer")
    assert got["totalresults"] == "1"
    assert [t["tid"] for t in got["tickets"]["ticket"]] == [first["tid"]]
    await http.post(f"/_sim/tickets/whmcs/{first['id']}/close")
    got = await ok(http, "GetTickets", status="Closed")
    assert [t["id"] for t in got["tickets"]["ticket"]] == [first["id"]]
    got = await ok(http, "GetTickets", status="Awaiting Reply")
    assert got["numreturned"] == "2"
    got = await ok(http, "GetTickets", limitnum=1)
    assert (got["totalresults"], got["numreturned"]) == ("3", "1")


async def test_client_lookups(http: httpx.AsyncClient) -> None:
    await http.post(
        "/_sim/clients",
        json={"system": "whmcs", "email": "Bob@Example.org", "id": "7", "name": "Bob Roe"},
    )
    got = await ok(http, "GetClientsDetails", email="bob@example.org")
    assert got["id"] == "7" and got["client"]["email"] == "Bob@Example.org"
    _, message = await error(http, "GetClientsDetails", email="nobody@example.org")
    assert message == "Client Not Found"
    got = await ok(http, "GetClients", search="bob@")
    assert [c["id"] for c in got["clients"]["client"]] == ["7"]


async def test_authentication(http: httpx.AsyncClient) -> None:
    resp = await http.post(
        sim.PATH,
        data={
            "action": "GetTickets",
            "identifier": sim.IDENTIFIER,
            "secret": "wrong",
            "responsetype": "json",
        },
    )
    assert resp.status_code == 403
    assert resp.json() == {"result": "error", "message": "Authentication Failed"}
    # The same pair as username/password, and the legacy admin login with md5(password).
    for user, password in (
        (sim.IDENTIFIER, sim.SECRET),
        (sim.ADMIN_USERNAME, hashlib.md5(sim.ADMIN_PASSWORD.encode()).hexdigest()),
    ):
        resp = await http.post(
            sim.PATH,
            data={
                "action": "GetTickets",
                "username": user,
                "password": password,
                "responsetype": "json",
            },
        )
        assert resp.json()["result"] == "success", user


async def test_ip_allow_list_and_access_key(http: httpx.AsyncClient) -> None:
    await http.post("/_sim/whmcs/access", json={"allowed_ips": ["192.0.2.1"]})
    status, message = await error(http, "GetTickets")
    assert (status, message) == (403, "Invalid IP 127.0.0.1")
    assert (await ok(http, "GetTickets", accesskey=sim.ACCESS_KEY))["result"] == "success"
    await http.post("/_sim/reset")
    assert (await ok(http, "GetTickets"))["result"] == "success"


async def test_action_is_case_insensitive_and_unknown_is_refused(http: httpx.AsyncClient) -> None:
    assert (await ok(http, "gettickets"))["result"] == "success"
    _, message = await error(http, "NoSuchCommand")
    assert message == "Command Not Found"


async def test_faults(sims: Simulators, http: httpx.AsyncClient) -> None:
    await http.post("/_sim/fault", json={"system": "whmcs", "mode": "error", "count": 1})
    resp = await api(http, "GetTickets")
    assert resp.status_code == 503 and resp.headers["Retry-After"] == "1"
    assert (await ok(http, "GetTickets"))["result"] == "success"

    await http.post("/_sim/fault", json={"system": "whmcs", "mode": "reject", "count": 1})
    assert await error(http, "OpenTicket") == (200, "Department ID not found")

    await http.post("/_sim/fault", json={"system": "whmcs", "mode": "auth", "count": 1})
    assert await error(http, "GetTickets") == (403, "Authentication Failed")

    await http.post("/_sim/fault", json={"system": "whmcs", "mode": "down", "count": 1})
    with pytest.raises(httpx.TransportError):
        await api(http, "GetTickets")
    assert (await ok(http, "GetTickets"))["result"] == "success"


async def test_client_and_guest_replies_are_told_apart(http: httpx.AsyncClient) -> None:
    await http.post(
        "/_sim/clients",
        json={"system": "whmcs", "email": "bob@example.org", "id": "7", "name": "Bob Roe"},
    )
    data = await ok(http, "OpenTicket", deptid=1, subject="Hi", message="first", clientid=7)
    await ok(http, "AddTicketReply", ticketid=data["id"], message="client", clientid=7, noemail=1)
    await ok(
        http, "AddTicketReply", ticketid=data["id"], message="guest", name="B", email="b@x.org"
    )
    await ok(http, "AddTicketReply", ticketid=data["id"], message="md", clientid=7, useMarkdown=1)
    [t] = await tickets(http)
    assert [m["author"] for m in t["messages"]] == [
        "client:7",
        "client:7",
        "guest:b@x.org",
        "client:7",
    ]
    assert t["messages"][1]["fields"] == {"clientid": "7", "noemail": True, "markdown": False}
    assert t["messages"][2]["fields"]["name"] == "B"
    assert t["messages"][3]["fields"]["markdown"] is True  # the example's spelling counts too
    replies = (await ok(http, "GetTicket", ticketid=data["id"]))["replies"]["reply"]
    assert [(r["userid"], r["email"]) for r in replies] == [
        ("7", "bob@example.org"),
        ("7", "bob@example.org"),
        ("0", "b@x.org"),
        ("7", "bob@example.org"),
    ]


async def test_custom_closed_status_and_support_statuses(http: httpx.AsyncClient) -> None:
    data = await open_guest(http)
    await open_guest(http, subject="second")
    resp = await http.post(f"/_sim/tickets/whmcs/{data['id']}/close", json={"status": "Resolved"})
    assert resp.status_code == 200 and resp.json()["status"] == "Resolved"
    assert (await ok(http, "GetTicket", ticketid=data["id"]))["status"] == "Resolved"
    got = await ok(http, "GetSupportStatuses")
    counts = {s["title"]: s["count"] for s in got["statuses"]["status"]}
    assert counts["Resolved"] == 1 and counts["Open"] == 1 and counts["Closed"] == 0
    assert set(got["statuses"]["status"][0]) == {"title", "count"}  # as documented
    refused = await http.post("/_sim/tickets/interserver/x/close", json={"status": "Resolved"})
    assert refused.status_code in (400, 404)
