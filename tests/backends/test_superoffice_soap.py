"""SuperOffice SOAP backend against the real simulator on loopback (no mocks)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr
from zeep.exceptions import Fault

from gateway.backends.base import MemoryProgress
from gateway.backends.superoffice_soap import (
    SuperOfficeSoapBackend,
    SuperOfficeSoapConfig,
    map_code,
    map_exception,
)
from gateway.errors import BackendUnavailable, ConfigError, PermanentError, TransientError
from gateway.logs import event_text
from gateway.models import Attachment, Decision, ParsedMail, TicketRef
from gateway.simulators.server import Simulators
from gateway.simulators.state import ACCOUNT_EMAIL, PASSWORD

MakeBackend = Callable[..., SuperOfficeSoapBackend]


@pytest.fixture
async def sim_api(sims: Simulators) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=sims.base_url, timeout=10) as c:
        yield c


ALT_WSDL = Path(__file__).parents[2] / "gateway/simulators/wsdl/superoffice_customer_alt.wsdl"


@pytest.fixture(params=["packaged-wsdl", "installation-wsdl"])
async def make(
    sims: Simulators, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[MakeBackend]:
    """Backends over our packaged WSDL, and (second run of every test) over the simulator's
    installation-style WSDL (other namespace, part names, SOAP-encoded arrays): the backend must
    behave the same with either."""
    made: list[SuperOfficeSoapBackend] = []
    path = "/superoffice/soap/customer"
    wsdl: dict[str, Any] = {}
    if request.param == "installation-wsdl":
        path = "/superoffice/soap/customer-alt"
        (tmp_path / "customer.wsdl").write_bytes(ALT_WSDL.read_bytes())
        wsdl = {"wsdl": "customer.wsdl"}  # a saved copy (the fetch would block this loop)

    def factory(**overrides: Any) -> SuperOfficeSoapBackend:
        raw: dict[str, Any] = {
            "type": "superoffice-soap",
            "url": sims.base_url + path,
            "username": ACCOUNT_EMAIL,
            "password": PASSWORD,
            "timeout": 5,
            **wsdl,
        }
        raw.update(overrides)
        backend = SuperOfficeSoapBackend(
            "so", SuperOfficeSoapConfig.model_validate(raw), base_dir=tmp_path
        )
        made.append(backend)
        return backend

    yield factory
    for b in made:
        await b.aclose()


async def fault(api: httpx.AsyncClient, mode: str, **extra: Any) -> None:
    r = await api.post("/_sim/fault", json={"system": "superoffice-soap", "mode": mode, **extra})
    r.raise_for_status()


async def tickets(api: httpx.AsyncClient) -> list[dict[str, Any]]:
    r = await api.get("/_sim/tickets", params={"system": "superoffice-soap"})
    data: list[dict[str, Any]] = r.json()
    return data


def mail(**kw: Any) -> ParsedMail:
    base: dict[str, Any] = {
        "message_id": "m1@example.org",
        "subject": "Printer on fire",
        "from_addr": "alice@example.org",
        "from_name": "Alice Example",
        "to": ("support@example.com",),
        "date": "Mon, 23 Nov 2026 10:00:00 +0000",
        "text": "It is really burning.\nPlease help.",
    }
    base.update(kw)
    return ParsedMail(**base)


def decision(**ticket: Any) -> Decision:
    return Decision(rule="support", backend="so", action="new", ticket=ticket)


async def test_open_ticket_with_fields_and_header_block(
    make: MakeBackend, sim_api: httpx.AsyncClient
) -> None:
    backend = make()
    progress = MemoryProgress()
    d = decision(category=2, priority=3, slevel="external", extra={"x_1": "{sender}", "x_2": "vip"})
    ref = await backend.open_ticket(d, mail(), progress)
    assert ref == TicketRef(backend="so", system="superoffice-soap", id=ref.id, ref=ref.id)
    [t] = await tickets(sim_api)
    assert t["id"] == ref.id and t["ref"] == ref.ref
    assert t["title"] == "Printer on fire"
    assert t["requester"] == ACCOUNT_EMAIL
    assert t["fields"] == {
        "categoryId": 2,
        "priorityId": 3,
        "sLevel": 2,
        "extraField": {"x_1": "alice@example.org", "x_2": "vip"},
    }
    [m] = t["messages"]
    assert m["author"] == ACCOUNT_EMAIL
    assert m["body"].startswith(
        "From: Alice Example <alice@example.org>\nTo: support@example.com\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0000\n\nIt is really burning.\nPlease help."
    )
    assert m["attachments"] == []
    assert progress.begun == ["newTicket", "addMessage"]
    assert progress.data["newTicket"] == {"ticket_id": ref.id}
    assert await backend.ticket_status(ref) == "open"


async def test_defaults_priority_minus_one_and_internal_slevel(
    make: MakeBackend, sim_api: httpx.AsyncClient
) -> None:
    backend = make(default_category=3)
    await backend.open_ticket(decision(), mail(subject=""), MemoryProgress())
    await backend.open_ticket(decision(slevel=1, priority=-1), mail(), MemoryProgress())
    await backend.open_ticket(decision(slevel="internal"), mail(), MemoryProgress())
    t1, t2, t3 = await tickets(sim_api)
    assert t1["title"] == "(no subject)"
    assert t1["fields"] == {"categoryId": 3, "priorityId": -1, "sLevel": 2, "extraField": {}}
    assert t2["fields"]["sLevel"] == 1 and t2["fields"]["priorityId"] == -1
    assert t3["fields"]["sLevel"] == 1


async def test_attachments_forwarded_and_listed(
    make: MakeBackend, sim_api: httpx.AsyncClient
) -> None:
    backend = make(max_attachment_bytes=1000)
    atts = (
        Attachment("report.pdf", "application/pdf", b"%PDF-1.4 tiny"),
        Attachment("logo.png", "image/png", b"\x89PNG", inline=True, content_id="logo"),
        Attachment("setup.exe", "application/octet-stream", b"MZ"),
        Attachment("huge.zip", "application/zip", b"0" * 5000),
        Attachment("notes.txt", "text/plain", "ünïcode\n".encode()),
    )
    progress = MemoryProgress()
    await backend.open_ticket(decision(), mail(attachments=atts), progress)
    [t] = await tickets(sim_api)
    [m] = t["messages"]
    # the inline image goes as a file: the ticket text cannot show it where it stood
    assert m["attachments"] == ["report.pdf", "logo.png", "notes.txt"]
    assert (
        "Attachments not forwarded (2): setup.exe (blocked type), huge.zip (too large: 5000 bytes)"
        in m["body"]
    )
    assert progress.data["addAttachment.0"]["filename"] == "report.pdf"
    assert progress.data["addAttachment.1"]["filename"] == "logo.png"
    assert progress.data["addAttachment.2"]["filename"] == "notes.txt"


async def test_follow_up_adds_a_message_and_reopens(
    make: MakeBackend, sim_api: httpx.AsyncClient
) -> None:
    backend = make()
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    r = await sim_api.post(f"/_sim/tickets/superoffice-soap/{ref.id}/close")
    assert r.status_code == 200
    assert await backend.ticket_status(ref) == "closed"
    await backend.add_message(ref, mail(text="Still burning"), MemoryProgress())
    await backend.add_message(ref, mail(text="I am away"), MemoryProgress(), automatic=True)
    [t] = await tickets(sim_api)
    assert len(t["messages"]) == 3
    assert "Still burning" in t["messages"][1]["body"]
    assert t["messages"][1]["body"].startswith("From: Alice Example <alice@example.org>")
    assert t["messages"][2]["body"].startswith("[automatic reply")
    assert await backend.ticket_status(ref) == "open"


async def test_follow_up_on_ticket_made_elsewhere(
    make: MakeBackend, sim_api: httpx.AsyncClient
) -> None:
    r = await sim_api.post(
        "/_sim/tickets",
        json={"system": "superoffice-soap", "id": "777", "title": "old", "requester": "bob@x.org"},
    )
    assert r.status_code == 201
    backend = make()
    ref = TicketRef("so", "superoffice-soap", "777", "777")
    await backend.add_message(ref, mail(), MemoryProgress())
    [t] = await tickets(sim_api)
    assert len(t["messages"]) == 1


async def test_resume_after_new_ticket_makes_no_second_ticket(
    make: MakeBackend, sim_api: httpx.AsyncClient
) -> None:
    backend = make()
    first = MemoryProgress()
    ref = await backend.open_ticket(decision(), mail(), first)
    # A crash after newTicket was recorded but before addMessage: only the step data survives.
    resumed = MemoryProgress({"newTicket": first.data["newTicket"]})
    again = await make().open_ticket(decision(), mail(text="resumed"), resumed)
    assert again == ref
    assert resumed.begun == ["addMessage"]
    [t] = await tickets(sim_api)
    assert [m["body"].endswith("resumed") for m in t["messages"]] == [False, True]
    # Everything done: nothing is called again.
    done = MemoryProgress(resumed.data)
    assert await make().open_ticket(decision(), mail(), done) == ref
    assert done.begun == []
    assert len((await tickets(sim_api))[0]["messages"]) == 2


async def test_resume_reuses_uploaded_attachments(
    make: MakeBackend, sim_api: httpx.AsyncClient
) -> None:
    backend = make()
    att = Attachment("a.txt", "text/plain", b"hello")
    progress = MemoryProgress()
    ref = await backend.open_ticket(decision(), mail(attachments=(att,)), progress)
    resumed = MemoryProgress(
        {
            "newTicket": progress.data["newTicket"],
            "addAttachment.0": progress.data["addAttachment.0"],
        }
    )
    await backend.add_message(ref, mail(attachments=(att,)), resumed)
    assert resumed.data["addAttachment.0"] == progress.data["addAttachment.0"]
    [t] = await tickets(sim_api)
    assert [m["attachments"] for m in t["messages"]] == [["a.txt"], ["a.txt"]]


async def test_session_expiry_is_renewed(
    make: MakeBackend, sim_api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.backend.superoffice_soap")
    backend = make()
    await backend.open_ticket(decision(), mail(), MemoryProgress())
    (await sim_api.post("/_sim/sessions/expire")).raise_for_status()
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert await backend.ticket_status(ref) == "open"
    events = [event_text(r) for r in caplog.records]
    assert sum("event=login " in e for e in events) == 2
    assert any("event=session_expired" in e for e in events)
    assert len(await tickets(sim_api)) == 2


async def test_wrong_password_is_backend_unavailable(
    make: MakeBackend, sim_api: httpx.AsyncClient
) -> None:
    backend = make(password="not-it")
    with pytest.raises(BackendUnavailable, match="code 1"):
        await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert await tickets(sim_api) == []


async def test_password_from_file_relative_to_config_dir(
    make: MakeBackend, tmp_path: Path, sim_api: httpx.AsyncClient
) -> None:
    (tmp_path / "so.pw").write_text(PASSWORD + "\n")
    backend = make(password=None, password_file="so.pw")
    await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert len(await tickets(sim_api)) == 1


async def test_auth_fault_with_a_session_is_backend_unavailable(
    make: MakeBackend, sim_api: httpx.AsyncClient
) -> None:
    backend = make()
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    await fault(sim_api, "auth")
    with pytest.raises(BackendUnavailable):
        await backend.add_message(ref, mail(), MemoryProgress())
    await fault(sim_api, "ok")
    await backend.add_message(ref, mail(), MemoryProgress())


async def test_reject_is_permanent_with_the_systems_text(
    make: MakeBackend, sim_api: httpx.AsyncClient
) -> None:
    backend = make()
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())  # logged in
    await fault(sim_api, "reject", count=1)
    with pytest.raises(PermanentError) as info:
        await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert str(info.value).startswith(
        "superoffice-soap code 8: Invalid category (simulated rejection)"
    )
    await fault(sim_api, "reject", count=1)
    with pytest.raises(PermanentError, match="code 13"):
        await backend.add_message(ref, mail(), MemoryProgress())


@pytest.mark.parametrize(
    ("ticket", "code"),
    [({"category": 4}, 8), ({"priority": 4}, 9), ({"extra": {"x_99": "v"}}, 12)],
)
async def test_business_errors_are_permanent(
    make: MakeBackend, ticket: dict[str, Any], code: int
) -> None:
    with pytest.raises(PermanentError, match=f"code {code}: Invalid"):
        await make().open_ticket(decision(**ticket), mail(), MemoryProgress())


async def test_unknown_ticket(make: MakeBackend) -> None:
    backend = make()
    ref = TicketRef("so", "superoffice-soap", "424242", "424242")
    with pytest.raises(PermanentError, match="unknown ticket 424242"):
        await backend.ticket_status(ref)
    with pytest.raises(PermanentError, match="code 13"):
        await backend.add_message(ref, mail(), MemoryProgress())


@pytest.mark.parametrize("mode", ["error", "down"])
async def test_error_and_down_are_transient(
    make: MakeBackend, sim_api: httpx.AsyncClient, mode: str
) -> None:
    backend = make()
    await fault(sim_api, mode)
    with pytest.raises(TransientError):
        await backend.open_ticket(decision(), mail(), MemoryProgress())
    await fault(sim_api, "ok")
    await backend.open_ticket(decision(), mail(), MemoryProgress())


async def test_error_503_carries_retry_after(make: MakeBackend, sim_api: httpx.AsyncClient) -> None:
    await fault(sim_api, "error")
    with pytest.raises(TransientError) as info:
        await make().open_ticket(decision(), mail(), MemoryProgress())
    assert info.value.retry_after == 1.0


async def test_connection_refused_is_transient(make: MakeBackend) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nobody listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = make(url=f"http://127.0.0.1:{port}/superoffice/soap/customer")
    with pytest.raises(TransientError):
        await backend.open_ticket(decision(), mail(), MemoryProgress())


async def test_wrong_path_is_backend_unavailable(make: MakeBackend, sims: Simulators) -> None:
    backend = make(url=sims.base_url + "/no/such/endpoint")
    with pytest.raises(BackendUnavailable, match="HTTP 404"):
        await backend.open_ticket(decision(), mail(), MemoryProgress())


async def test_find_existing_cannot_search(make: MakeBackend) -> None:
    assert await make().find_existing(decision(), mail()) is None


async def test_concurrent_calls_share_one_login(
    make: MakeBackend, sim_api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.backend.superoffice_soap")
    backend = make(concurrency=2)
    refs = await asyncio.gather(
        *(
            backend.open_ticket(decision(), mail(subject=f"s{i}"), MemoryProgress())
            for i in range(8)
        )
    )
    assert len({r.id for r in refs}) == 8
    assert sum("event=login " in event_text(r) for r in caplog.records) == 1
    assert sorted(t["title"] for t in await tickets(sim_api)) == [f"s{i}" for i in range(8)]


async def test_text_with_control_characters_is_sent(
    make: MakeBackend, sim_api: httpx.AsyncClient
) -> None:
    await make().open_ticket(
        decision(), mail(subject="bad\x00title\x1b", text="a\x07b\tc"), MemoryProgress()
    )
    [t] = await tickets(sim_api)
    assert t["title"] == "badtitle"
    assert t["messages"][0]["body"].endswith("ab\tc")


async def test_logs_hold_no_secrets_or_text(
    make: MakeBackend, sim_api: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    backend = make()
    ref = await backend.open_ticket(decision(), mail(text="SECRET-BODY-TEXT"), MemoryProgress())
    (await sim_api.post("/_sim/sessions/expire")).raise_for_status()
    await backend.add_message(ref, mail(text="SECRET-BODY-TEXT"), MemoryProgress())
    await fault(sim_api, "reject", count=1)
    with pytest.raises(PermanentError):
        await backend.open_ticket(decision(), mail(), MemoryProgress())
    text = "\n".join(event_text(r) for r in caplog.records)
    assert PASSWORD not in text
    assert "SECRET-BODY-TEXT" not in text
    assert not re.search(r"\b[0-9a-f]{32}\b", text)  # no session key


def test_map_code() -> None:
    assert isinstance(map_code("login", 1, ""), BackendUnavailable)
    assert isinstance(map_code("newTicket", 4, "no rights"), BackendUnavailable)
    assert isinstance(map_code("newTicket", 19, ""), BackendUnavailable)
    err = map_code("newTicket", 8, "Invalid category 7")
    assert isinstance(err, PermanentError)
    assert str(err) == "superoffice-soap code 8: Invalid category 7 (newTicket)"
    assert "InvalidExtraField" in str(map_code("newTicket", 12, ""))


def test_map_exception_for_faults_and_transport() -> None:
    server = Fault("busy", code="SOAP-ENV:Server")
    client = Fault("bad request", code="soap:Client")
    assert isinstance(map_exception("newTicket", server), TransientError)
    assert isinstance(map_exception("newTicket", Fault("Unknown fault occured")), TransientError)
    assert isinstance(map_exception("newTicket", client), PermanentError)
    assert isinstance(map_exception("login", client), BackendUnavailable)
    assert isinstance(map_exception("getTicket", client), BackendUnavailable)
    assert isinstance(
        map_exception("addMessage", Fault("x", code="VersionMismatch")), BackendUnavailable
    )
    assert isinstance(map_exception("login", httpx.ReadTimeout("t")), TransientError)
    assert isinstance(map_exception("login", httpx.RemoteProtocolError("r")), TransientError)
    assert isinstance(map_exception("login", httpx.UnsupportedProtocol("u")), BackendUnavailable)


def test_wsdl_missing_is_a_config_error(tmp_path: Path) -> None:
    cfg = SuperOfficeSoapConfig.model_validate(
        {
            "type": "superoffice-soap",
            "url": "http://127.0.0.1:9/x",
            "username": ACCOUNT_EMAIL,
            "password": SecretStr(PASSWORD),
            "wsdl": "missing.wsdl",
        }
    )
    with pytest.raises(ConfigError, match="cannot load WSDL"):
        SuperOfficeSoapBackend("so", cfg, base_dir=tmp_path)


async def test_own_wsdl_file_with_other_binding_names(
    make: MakeBackend, tmp_path: Path, sim_api: httpx.AsyncClient, sims: Simulators
) -> None:
    packaged = Path(__file__).parents[2] / "gateway/backends/wsdl/superoffice_customer.wsdl"
    text = packaged.read_text().replace("customerBinding", "CustomerSoapBinding")
    text = text.replace("customerService", "InstallationService")
    (tmp_path / "own.wsdl").write_text(text)
    # relative to the config file's directory
    backend = make(wsdl="own.wsdl", url=sims.base_url + "/superoffice/soap/customer")
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert await backend.ticket_status(ref) == "open"
    assert len(await tickets(sim_api)) == 1


async def test_both_endpoints_share_tickets_and_status_2_is_closed(
    make: MakeBackend, sims: Simulators, sim_api: httpx.AsyncClient, tmp_path: Path
) -> None:
    packaged = make(url=sims.base_url + "/superoffice/soap/customer", wsdl=None)
    (tmp_path / "alt.wsdl").write_bytes(ALT_WSDL.read_bytes())
    alt = make(url=sims.base_url + "/superoffice/soap/customer-alt", wsdl="alt.wsdl")
    ref = await packaged.open_ticket(decision(extra={"x_1": "{sender}"}), mail(), MemoryProgress())
    await alt.add_message(ref, mail(text="via the other WSDL"), MemoryProgress())
    [t] = await tickets(sim_api)
    assert t["fields"]["extraField"] == {"x_1": "alice@example.org"}
    assert t["messages"][1]["body"].endswith("via the other WSDL")
    (await sim_api.post(f"/_sim/tickets/superoffice-soap/{ref.id}/close")).raise_for_status()
    assert await alt.ticket_status(ref) == "closed"  # numeric 2 in an encoded answer
    assert await packaged.ticket_status(ref) == "closed"


async def test_wsdl_that_does_not_fit_the_endpoint_is_backend_unavailable(
    make: MakeBackend, sims: Simulators
) -> None:
    backend = make(url=sims.base_url + "/superoffice/soap/customer", wsdl=None)
    other = make(url=sims.base_url + "/superoffice/soap/customer-alt", wsdl=None)
    made = await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert await backend.ticket_status(made) == "open"
    with pytest.raises(BackendUnavailable):  # packaged names against the installation's port
        await other.open_ticket(decision(), mail(), MemoryProgress())


async def test_closed_statuses_are_configurable(
    make: MakeBackend, sim_api: httpx.AsyncClient
) -> None:
    backend = make(closed_statuses=["2", "1"])  # an installation that counts 1 as closed too
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert await backend.ticket_status(ref) == "closed"
    other = make(closed_statuses=["closed"])  # words only: numeric 2 is not recognised
    (await sim_api.post(f"/_sim/tickets/superoffice-soap/{ref.id}/close")).raise_for_status()
    assert await other.ticket_status(ref) is None
