"""The SuperOffice WebAPI simulator, driven with plain httpx over loopback (no gateway code)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from gateway.simulators import superoffice_rest as so
from gateway.simulators.server import Simulators
from gateway.simulators.state import ACCOUNT_EMAIL, PASSWORD

AGENT = "/superoffice/api/v1/Agents/Ticket"
BASIC = {
    "Authorization": "Basic " + base64.b64encode(f"{ACCOUNT_EMAIL}:{PASSWORD}".encode()).decode()
}


@pytest.fixture
async def client(sims: Simulators) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sims.base_url, timeout=5) as c:
        yield c


async def _new_ticket(client: httpx.AsyncClient, **changes: Any) -> dict[str, Any]:
    entity = (await client.post(f"{AGENT}/CreateDefaultTicketEntity", headers=BASIC)).json()
    entity.update({"Title": "Printer on fire"}, **changes)
    r = await client.post(f"{AGENT}/SaveTicketEntity", headers=BASIC, json=entity)
    assert r.status_code == 200, r.text
    saved: dict[str, Any] = r.json()
    return saved


async def _sim_tickets(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    tickets: list[dict[str, Any]] = (
        await client.get("/_sim/tickets?system=superoffice-rest")
    ).json()
    return tickets


async def test_basic_auth_create_default_and_save(client: httpx.AsyncClient) -> None:
    r = await client.post(f"{AGENT}/CreateDefaultTicketEntity", headers=BASIC)
    assert r.status_code == 200
    default = r.json()
    assert default["TicketId"] == 0 and default["Slevel"] == "External"
    saved = await _new_ticket(
        client,
        Category={"TicketCategoryId": 2},
        Priority={"TicketPriorityId": 3},
        Slevel="internal",
        Person={"PersonId": so.DEFAULT_PERSON_ID},
    )
    assert saved["TicketId"] > 0 and saved["Category"]["TicketCategoryId"] == 2
    [t] = await _sim_tickets(client)
    assert t["id"] == t["ref"] == str(saved["TicketId"])
    assert t["title"] == "Printer on fire"
    assert t["requester"] == ACCOUNT_EMAIL
    assert t["fields"] == {"Category": 2, "Priority": 3, "Slevel": "Internal", "Person": 1}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic " + base64.b64encode(b"gateway@example.com:wrong").decode()},
        {"Authorization": "SOTicket demo-soticket"},  # no SO-AppToken
        {"Authorization": "SOTicket nope", "SO-AppToken": so.DEMO_APP_TOKEN},
        {"Authorization": "Bearer nope"},
        {"Authorization": "Bearer demo-token", "SO-AppToken": "wrong"},
    ],
)
async def test_bad_credentials_are_401_with_json(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    r = await client.post(f"{AGENT}/CreateDefaultTicketEntity", headers=headers)
    assert r.status_code == 401
    assert r.json()["Error"]
    assert "WWW-Authenticate" in r.headers


async def test_soticket_and_bearer_expire_with_the_session(client: httpx.AsyncClient) -> None:
    soticket = {"Authorization": f"SOTicket {so.DEMO_SOTICKET}", "SO-AppToken": so.DEMO_APP_TOKEN}
    bearer = {"Authorization": f"Bearer {so.DEMO_TOKEN}"}
    url = f"{AGENT}/CreateDefaultTicketEntity"
    assert (await client.post(url, headers=soticket)).status_code == 200
    assert (await client.post(url, headers=bearer)).status_code == 200

    await client.post("/_sim/sessions/expire")
    assert (await client.post(url, headers=soticket)).status_code == 401
    assert (await client.post(url, headers=bearer)).status_code == 401
    assert (await client.post(url, headers=BASIC)).status_code == 200  # Basic has no session

    # Bearer: OAuth 2.0 refresh grant.
    form = {
        "grant_type": "refresh_token",
        "client_id": so.DEMO_CLIENT_ID,
        "client_secret": so.DEMO_APP_TOKEN,
        "refresh_token": so.DEMO_REFRESH_TOKEN,
    }
    r = await client.post("/superoffice/login/common/oauth/tokens", data=form)
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    assert r.json()["token_type"] == "Bearer" and r.json()["expires_in"] > 0
    assert (await client.post(url, headers={"Authorization": f"Bearer {token}"})).status_code == 200
    bad = await client.post(
        "/superoffice/login/common/oauth/tokens", data={**form, "refresh_token": "x"}
    )
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_grant"
    bad = await client.post(
        "/superoffice/login/common/oauth/tokens", data={**form, "client_secret": "x"}
    )
    assert bad.status_code == 401

    # SOTicket: the system-user exchange.
    r = await client.post(
        "/superoffice/login/api/PartnerSystemUser/Authenticate",
        json={
            "SignedSystemToken": so.DEMO_SYSTEM_USER_TOKEN + ".202401010000.sig",
            "ApplicationToken": so.DEMO_APP_TOKEN,
            "ContextIdentifier": so.CONTEXT_ID,
            "ReturnTokenType": "Text",
        },
    )
    assert r.status_code == 200 and r.json()["IsSuccessful"] is True
    fresh = {"Authorization": f"SOTicket {r.json()['Token']}", "SO-AppToken": so.DEMO_APP_TOKEN}
    assert (await client.post(url, headers=fresh)).status_code == 200

    # A later expiry invalidates the issued credentials too.
    await client.post("/_sim/sessions/expire")
    assert (await client.post(url, headers=fresh)).status_code == 401
    assert (await client.post(url, headers={"Authorization": f"Bearer {token}"})).status_code == 401


async def test_bad_input_is_400_with_error_body(client: httpx.AsyncClient) -> None:
    entity = (await client.post(f"{AGENT}/CreateDefaultTicketEntity", headers=BASIC)).json()
    cases: list[tuple[dict[str, Any], str]] = [
        ({"Title": "x", "Category": {"TicketCategoryId": 99}}, "Unknown category 99"),
        ({"Title": "x", "Priority": {"TicketPriorityId": 99}}, "Unknown priority 99"),
        ({"Title": "x", "Person": {"PersonId": 424242}}, "Unknown person 424242"),
        ({"Title": "x", "Slevel": "Secret"}, "Unknown Slevel"),
        ({"Title": ""}, "Title is required"),
    ]
    for change, message in cases:
        r = await client.post(f"{AGENT}/SaveTicketEntity", headers=BASIC, json={**entity, **change})
        assert r.status_code == 400, change
        assert message in r.json()["Error"]
    r = await client.post(f"{AGENT}/SaveTicketEntity", headers=BASIC, content=b"{nope")
    assert r.status_code == 400
    assert await _sim_tickets(client) == []


async def test_unknown_ticket_is_404(client: httpx.AsyncClient) -> None:
    r = await client.post(f"{AGENT}/GetTicketEntity", params={"ticketEntityId": 777}, headers=BASIC)
    assert r.status_code == 404 and "777" in r.json()["Error"]
    assert (await client.get("/superoffice/api/v1/Ticket/777", headers=BASIC)).status_code == 404
    msg = (await client.post(f"{AGENT}/CreateDefaultTicketMessageEntity", headers=BASIC)).json()
    msg.update(Ticket={"TicketId": 777}, Body="hello")
    r = await client.post(f"{AGENT}/SaveTicketMessageEntity", headers=BASIC, json=msg)
    assert r.status_code == 404
    assert (await client.post(f"{AGENT}/NoSuchMethod", headers=BASIC)).status_code == 404


async def test_message_with_html_and_attachments(client: httpx.AsyncClient) -> None:
    ticket = await _new_ticket(client)
    att = await client.post(
        f"{AGENT}/SaveAttachmentEntity",
        headers=BASIC,
        json={"AttachmentId": 0, "Name": "log.txt", "ContentType": "text/plain", "AttSize": 5},
    )
    aid = att.json()["AttachmentId"]
    r = await client.post(
        f"{AGENT}/UploadAttachment",
        headers=BASIC,
        json={"AttachmentId": aid, "Content": base64.b64encode(b"hello").decode()},
    )
    assert r.status_code == 204
    msg = (await client.post(f"{AGENT}/CreateDefaultTicketMessageEntity", headers=BASIC)).json()
    msg.update(
        Ticket={"TicketId": ticket["TicketId"]},
        Body="plain text",
        HtmlBody="<p>html</p>",
        Author="alice@example.org",
    )
    r = await client.post(
        f"{AGENT}/SaveTicketMessageEntityWithNotify",
        headers=BASIC,
        json={"NewEntity": msg, "Notify": True},
    )
    assert r.status_code == 200, r.text
    mid = r.json()["EjMessageId"]
    assert mid > 0 and r.json()["Ticket"]["TicketId"] == ticket["TicketId"]
    link = {"TicketMessageEntityId": mid, "AttachmentIds": [aid]}
    for _ in range(2):  # connecting twice is harmless
        r = await client.post(f"{AGENT}/AddAttachments", headers=BASIC, json=link)
        assert r.status_code == 204
    [t] = await _sim_tickets(client)
    [m] = t["messages"]
    assert m == {
        "body": "plain text",
        "author": "alice@example.org",
        "attachments": ["log.txt"],
        "html": "<p>html</p>",
        "fields": {"Type": "Text"},  # what the call carried besides text (the default Type)
    }
    assert t["fields"]["Notify"] is True
    entity = (
        await client.post(
            f"{AGENT}/GetTicketEntity", params={"ticketEntityId": ticket["TicketId"]}, headers=BASIC
        )
    ).json()
    assert entity["NumMessages"] == 1 and entity["HasAttachment"] is True
    # An attachment without content cannot be connected; unknown message is 404.
    empty = await client.post(
        f"{AGENT}/SaveAttachmentEntity", headers=BASIC, json={"AttachmentId": 0, "Name": "e.bin"}
    )
    r = await client.post(
        f"{AGENT}/AddAttachments",
        headers=BASIC,
        json={"TicketMessageEntityId": mid, "AttachmentIds": [empty.json()["AttachmentId"]]},
    )
    assert r.status_code == 400
    r = await client.post(
        f"{AGENT}/AddAttachments",
        headers=BASIC,
        json={"TicketMessageEntityId": 1, "AttachmentIds": [aid]},
    )
    assert r.status_code == 404


async def test_person_and_ticket_archives(client: httpx.AsyncClient) -> None:
    await client.post(
        "/_sim/clients",
        json={"system": "superoffice-rest", "email": "Bob@Example.org", "id": "77", "name": "Bob"},
    )
    r = await client.get(
        "/superoffice/api/v1/Person",
        headers=BASIC,
        params={
            "$select": "personId,fullName",
            "$filter": "personEmail/emailAddress eq 'bob@example.org'",
        },
    )
    assert r.status_code == 200
    assert r.json()["value"] == [
        {"PrimaryKey": 77, "EntityName": "person", "personId": 77, "fullName": "Bob"}
    ]
    r = await client.get(
        "/superoffice/api/v1/Person",
        headers=BASIC,
        params={"$filter": "personEmail/emailAddress eq 'nobody@example.org'"},
    )
    assert r.json()["value"] == []
    r = await client.get("/superoffice/api/v1/Person", headers=BASIC, params={"$filter": "x eq 1"})
    assert r.status_code == 400

    ticket = await _new_ticket(client, Title="It's broken", Person={"PersonId": 77})
    [t] = await _sim_tickets(client)
    assert t["requester"] == "Bob@Example.org"
    r = await client.get(
        "/superoffice/api/v1/Ticket",
        headers=BASIC,
        params={
            "$select": "ticketId,title",
            "$filter": "title eq 'It''s broken' and personId eq 77 "
            "and createdAt after '2000-01-01T00:00:00'",
            "$orderBy": "createdAt desc",
            "$top": "1",
        },
    )
    assert r.status_code == 200, r.text
    assert [row["ticketId"] for row in r.json()["value"]] == [ticket["TicketId"]]


async def test_closed_ticket_reads_closed(client: httpx.AsyncClient) -> None:
    ticket = await _new_ticket(client)
    await client.post(f"/_sim/tickets/superoffice-rest/{ticket['TicketId']}/close")
    r = await client.get(f"/superoffice/api/v1/Ticket/{ticket['TicketId']}", headers=BASIC)
    assert r.json()["BaseStatus"] == "Closed"
    r = await client.post(
        f"{AGENT}/GetTicket", params={"ticketId": ticket["TicketId"]}, headers=BASIC
    )
    assert r.json()["BaseStatus"] == "Closed" and r.json()["Category"] == so.DEFAULT_CATEGORY


async def test_faults(client: httpx.AsyncClient) -> None:
    url = f"{AGENT}/CreateDefaultTicketEntity"
    await client.post(
        "/_sim/fault", json={"system": "superoffice-rest", "mode": "error", "count": 1}
    )
    r = await client.post(url, headers=BASIC)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1"
    assert (await client.post(url, headers=BASIC)).status_code == 200  # count used up

    await client.post("/_sim/fault", json={"system": "superoffice-rest", "mode": "reject"})
    r = await client.post(url, headers=BASIC)
    assert r.status_code == 400 and "rejected" in r.json()["Error"]

    await client.post("/_sim/fault", json={"system": "superoffice-rest", "mode": "auth"})
    assert (await client.post(url, headers=BASIC)).status_code == 401

    await client.post("/_sim/fault", json={"system": "superoffice-rest", "mode": "down"})
    with pytest.raises(httpx.TransportError):
        await client.post(url, headers=BASIC)

    await client.post("/_sim/fault", json={"system": "superoffice-rest", "mode": "ok"})
    assert (await client.post(url, headers=BASIC)).status_code == 200


async def test_reset_forgets_messages(client: httpx.AsyncClient) -> None:
    ticket = await _new_ticket(client)
    msg = {"Ticket": {"TicketId": ticket["TicketId"]}, "Body": "x"}
    r = await client.post(f"{AGENT}/SaveTicketMessageEntity", headers=BASIC, json=msg)
    mid = r.json()["EjMessageId"]
    await client.post("/_sim/reset")
    r = await client.post(
        f"{AGENT}/AddAttachments",
        headers=BASIC,
        json={"TicketMessageEntityId": mid, "AttachmentIds": []},
    )
    assert r.status_code == 404
