"""SuperOfficeRestBackend against the WebAPI simulator on loopback (real HTTP, no mocks)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pydantic
import pytest

from gateway.backends.base import MemoryProgress
from gateway.backends.http import retry_after as _retry_after
from gateway.backends.superoffice_rest import (
    SuperOfficeRestBackend,
    SuperOfficeRestConfig,
    validate_ticket_fields,
)
from gateway.errors import BackendUnavailable, PermanentError, TransientError
from gateway.models import Attachment, Decision, ParsedMail, TicketRef
from gateway.simulators import superoffice_rest as so
from gateway.simulators.server import Simulators
from gateway.simulators.state import ACCOUNT_EMAIL, PASSWORD

SYSTEM = "superoffice-rest"


@pytest.fixture
async def sim(sims: Simulators) -> AsyncIterator[httpx.AsyncClient]:
    """A plain client for the /_sim inspection API."""
    async with httpx.AsyncClient(base_url=sims.base_url, timeout=5) as c:
        yield c


Make = Callable[..., SuperOfficeRestBackend]


@pytest.fixture
async def make(sims: Simulators, tmp_path: Path) -> AsyncIterator[Make]:
    made: list[SuperOfficeRestBackend] = []

    def _make(**overrides: Any) -> SuperOfficeRestBackend:
        raw: dict[str, Any] = {
            "type": SYSTEM,
            "url": f"{sims.base_url}/superoffice",
            "auth": "basic",
            "username": ACCOUNT_EMAIL,
            "password": PASSWORD,
            "default_person": so.DEFAULT_PERSON_ID,
            "timeout": 5,
        }
        raw.update(overrides)
        raw = {k: v for k, v in raw.items() if v is not None}
        backend = SuperOfficeRestBackend("rest", SuperOfficeRestConfig(**raw), base_dir=tmp_path)
        made.append(backend)
        return backend

    yield _make
    for b in made:
        await b.aclose()


def mail(**changes: Any) -> ParsedMail:
    base: dict[str, Any] = {
        "message_id": "m1@example.org",
        "subject": "Printer on fire",
        "from_addr": "alice@example.org",
        "from_name": "Alice Example",
        "to": ("sales@example.com",),
        "date": "Mon, 1 Jan 2024 10:00:00 +0000",
        "text": "It is really burning.",
    }
    base.update(changes)
    return ParsedMail(**base)


def decision(**ticket: Any) -> Decision:
    return Decision(rule="sales", backend="rest", action="new", ticket=ticket)


async def tickets(sim: httpx.AsyncClient) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = (await sim.get(f"/_sim/tickets?system={SYSTEM}")).json()
    return found


async def calls(sim: httpx.AsyncClient) -> int:
    n: int = (await sim.get("/_sim/calls")).json()[SYSTEM]
    return n


async def fault(sim: httpx.AsyncClient, mode: str, **extra: Any) -> None:
    r = await sim.post("/_sim/fault", json={"system": SYSTEM, "mode": mode, **extra})
    assert r.status_code == 200


async def test_ticket_with_fields_and_message(make: Make, sim: httpx.AsyncClient) -> None:
    backend = make()
    progress = MemoryProgress()
    ref = await backend.open_ticket(
        decision(category=2, priority=3, slevel="internal"), mail(), progress
    )
    assert ref.backend == "rest" and ref.system == SYSTEM and ref.id == ref.ref
    [t] = await tickets(sim)
    assert t["id"] == ref.id and t["title"] == "Printer on fire"
    # Unknown sender: the configured default person.
    assert t["requester"] == ACCOUNT_EMAIL
    assert t["fields"] == {
        "Category": 2,
        "Priority": 3,
        "Slevel": "Internal",
        "Person": so.DEFAULT_PERSON_ID,
        "FromAddress": "alice@example.org",
        "Notify": False,  # the gateway acknowledges, not SuperOffice
    }
    [m] = t["messages"]
    assert m["author"] == "alice@example.org"
    assert m["body"].startswith("From: Alice Example <alice@example.org>\nTo: sales@example.com")
    assert m["body"].endswith("It is really burning.")
    assert m["html"] == "" and m["attachments"] == []
    assert progress.begun == ["ticket", "message"]
    assert progress.data["ticket"]["id"] == ref.id


async def test_notify_and_defaults_from_config(make: Make, sim: httpx.AsyncClient) -> None:
    backend = make(default_category=4, default_priority=1, notify=True)
    await backend.open_ticket(decision(), mail(), MemoryProgress())
    await backend.open_ticket(decision(notify=False, category=3), mail(), MemoryProgress())
    first, second = await tickets(sim)
    assert first["fields"]["Category"] == 4 and first["fields"]["Priority"] == 1
    assert first["fields"]["Notify"] is True
    assert second["fields"]["Category"] == 3 and second["fields"]["Notify"] is False


async def test_html_body_carries_the_sender_block(make: Make, sim: httpx.AsyncClient) -> None:
    html = "<html><body><p>It is <b>really</b> burning &amp; smoking.</p></body></html>"
    await make().open_ticket(decision(), mail(html=html), MemoryProgress())
    [t] = await tickets(sim)
    [m] = t["messages"]
    assert "<b>really</b>" in m["html"]
    assert m["html"].index("Alice Example &lt;alice@example.org&gt;") < m["html"].index("<p>It")
    assert m["body"].endswith("It is really burning.")


async def test_html_body_is_sanitised_and_shows_its_inline_images(
    make: Make, sim: httpx.AsyncClient
) -> None:
    html = (
        "<html><head><title>T</title><style>p{background:url(https://t.example/s.gif)}</style>"
        '<meta http-equiv="refresh" content="0;url=https://evil.example/"></head>'
        '<body onload="steal()"><p style="color:red;background-image:url(https://t.example/b.gif)"'
        ">Screen <b>below</b>:</p>"
        '<img src="cid:shot@customer.example" alt="shot">'
        '<img src="https://tracker.example/pixel.gif" width="1">'
        '<a href="javascript:alert(1)">run</a> <a href="https://docs.example/fix">fix</a>'
        "<script>alert(2)</script><iframe src='https://evil.example/'></iframe></body></html>"
    )
    atts = (
        Attachment(
            "shot.png", "image/png", b"\x89PNG1", inline=True, content_id="shot@customer.example"
        ),
        Attachment("report.pdf", "application/pdf", b"%PDF-1.4"),
    )
    await make().open_ticket(decision(), mail(html=html, attachments=atts), MemoryProgress())
    [t] = await tickets(sim)
    [m] = t["messages"]
    got = m["html"]
    assert m["fields"]["Type"] == "Html" and m["body"].endswith("It is really burning.")
    assert '<p style="color:red">Screen <b>below</b>:</p>' in got
    assert '<img src="cid:shot@customer.example" alt="shot">' in got
    assert 'href="https://docs.example/fix" rel="noopener noreferrer"' in got
    for banned in ("script", "alert", "onload", "iframe", "tracker.example", "t.example",
                   "evil.example", "javascript", "<title", "<style", "<meta"):  # fmt: skip
        assert banned not in got, banned
    # the inline image goes as an inline image of the HTML; a real attachment stays a file
    assert m["attachments"] == ["shot.png", "report.pdf"]
    assert m["fields"]["InlineImages"] == {"shot.png": "shot@customer.example"}


async def test_text_only_mail_and_empty_html_send_no_html_body(
    make: Make, sim: httpx.AsyncClient
) -> None:
    backend = make()
    inline = Attachment("logo.png", "image/png", b"\x89PNG", inline=True, content_id="logo")
    await backend.open_ticket(decision(), mail(attachments=(inline,)), MemoryProgress())
    await backend.open_ticket(decision(), mail(html="<script>x()</script>"), MemoryProgress())
    for t in await tickets(sim):
        [m] = t["messages"]
        assert m["html"] == "" and m["fields"]["Type"] == "Text"
        # no HTML to show it in: the inline image is an ordinary file of the ticket
        assert "InlineImages" not in m["fields"]


async def test_attachments_uploaded_and_connected(make: Make, sim: httpx.AsyncClient) -> None:
    atts = (
        Attachment("report.pdf", "application/pdf", b"%PDF-1.4 data"),
        Attachment("logo.png", "image/png", b"\x89PNG", inline=True, content_id="logo"),
        Attachment("evil.exe", "application/octet-stream", b"MZ"),
        Attachment("notes.txt", "text/plain", "grüße".encode()),
    )
    progress = MemoryProgress()
    await make().open_ticket(decision(), mail(attachments=atts), progress)
    [t] = await tickets(sim)
    [m] = t["messages"]
    # the inline image goes as a file: the ticket text cannot show it where it stood
    assert m["attachments"] == ["report.pdf", "logo.png", "notes.txt"]
    assert "Attachments not forwarded (1): evil.exe (blocked type)" in m["body"]
    assert progress.begun == ["ticket", "attachments", "message"]
    assert len(progress.data["attachments"]["ids"]) == 3


async def test_person_lookup_by_sender_is_cached(make: Make, sim: httpx.AsyncClient) -> None:
    await sim.post(
        "/_sim/clients",
        json={"system": SYSTEM, "email": "alice@example.org", "id": "501", "name": "Alice"},
    )
    backend = make()
    await backend.open_ticket(decision(), mail(), MemoryProgress())
    before = await calls(sim)
    await backend.open_ticket(decision(), mail(message_id="m2@example.org"), MemoryProgress())
    # Warm cache and credentials: CreateDefault + Save for the ticket and for the message.
    assert await calls(sim) - before == 4
    first, second = await tickets(sim)
    for t in (first, second):
        assert t["requester"] == "alice@example.org" and t["fields"]["Person"] == 501
    # A rule may name the person outright, without a lookup.
    await backend.open_ticket(decision(person=so.DEFAULT_PERSON_ID), mail(), MemoryProgress())
    assert (await tickets(sim))[2]["fields"]["Person"] == so.DEFAULT_PERSON_ID


async def test_unknown_sender_without_default_person(make: Make, sim: httpx.AsyncClient) -> None:
    await make(default_person=None).open_ticket(decision(), mail(), MemoryProgress())
    [t] = await tickets(sim)
    assert "Person" not in t["fields"]
    assert t["requester"] == "alice@example.org"  # the ticket's FromAddress


async def test_follow_up_adds_a_message(make: Make, sim: httpx.AsyncClient) -> None:
    backend = make()
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    await backend.add_message(ref, mail(text="Now it is out."), MemoryProgress())
    await backend.add_message(ref, mail(text="Out of office."), MemoryProgress(), automatic=True)
    [t] = await tickets(sim)
    assert [m["body"].rsplit("\n", 1)[-1] for m in t["messages"]] == [
        "It is really burning.",
        "Now it is out.",
        "Out of office.",
    ]
    assert t["messages"][2]["body"].startswith("[automatic reply")


async def test_follow_up_on_a_ticket_made_elsewhere(make: Make, sim: httpx.AsyncClient) -> None:
    r = await sim.post(
        "/_sim/tickets",
        json={"system": SYSTEM, "id": "4242", "title": "Old", "requester": "x@example.org"},
    )
    assert r.status_code == 201
    backend = make()
    ref = TicketRef("rest", SYSTEM, "4242", "4242")
    assert await backend.ticket_status(ref) == "open"
    await backend.add_message(ref, mail(), MemoryProgress())
    [t] = await tickets(sim)
    assert len(t["messages"]) == 1


async def test_resume_from_progress(make: Make, sim: httpx.AsyncClient) -> None:
    backend = make()
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    # A crash after SaveTicketEntity: the next attempt only adds the message.
    progress = MemoryProgress({"ticket": {"id": ref.id, "person": so.DEFAULT_PERSON_ID}})
    again = await backend.open_ticket(decision(), mail(text="second try"), progress)
    assert again == ref
    assert progress.begun == ["message"]
    [t] = await tickets(sim)
    assert len(t["messages"]) == 2
    # Everything done: nothing is sent again.
    before = await calls(sim)
    await backend.open_ticket(decision(), mail(), progress)
    assert await calls(sim) == before


async def test_resume_after_uploads_connects_them(make: Make, sim: httpx.AsyncClient) -> None:
    backend = make()
    atts = (Attachment("a.txt", "text/plain", b"aaa"),)
    first = MemoryProgress()
    ref = await backend.open_ticket(decision(), mail(attachments=atts), first)
    # Same mail, message already recorded: only AddAttachments again (harmless).
    progress = MemoryProgress(dict(first.data))
    before = await calls(sim)
    await backend.open_ticket(decision(), mail(attachments=atts), progress)
    assert await calls(sim) - before == 1
    [t] = await tickets(sim)
    assert t["id"] == ref.id and t["messages"][0]["attachments"] == ["a.txt"]


async def test_bearer_token_refresh_after_expiry(make: Make, sim: httpx.AsyncClient) -> None:
    sims_url = str(sim.base_url).rstrip("/")
    backend = make(
        auth="bearer",
        username=None,
        password=None,
        token=so.DEMO_TOKEN,
        refresh_token=so.DEMO_REFRESH_TOKEN,
        token_url=f"{sims_url}/superoffice/login/common/oauth/tokens",
        client_id=so.DEMO_CLIENT_ID,
        app_token=so.DEMO_APP_TOKEN,
    )
    await backend.open_ticket(decision(), mail(), MemoryProgress())
    await sim.post("/_sim/sessions/expire")
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert await backend.ticket_status(ref) == "open"
    assert len(await tickets(sim)) == 2


async def test_bearer_without_static_token_fetches_one(make: Make, sim: httpx.AsyncClient) -> None:
    sims_url = str(sim.base_url).rstrip("/")
    backend = make(
        auth="bearer",
        username=None,
        password=None,
        refresh_token=so.DEMO_REFRESH_TOKEN,
        token_url=f"{sims_url}/superoffice/login/common/oauth/tokens",
        client_id=so.DEMO_CLIENT_ID,
        app_token=so.DEMO_APP_TOKEN,
    )
    await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert len(await tickets(sim)) == 1


async def test_bearer_refresh_refused_is_unavailable(make: Make, sim: httpx.AsyncClient) -> None:
    sims_url = str(sim.base_url).rstrip("/")
    backend = make(
        auth="bearer",
        username=None,
        password=None,
        token=so.DEMO_TOKEN,
        refresh_token="revoked",
        token_url=f"{sims_url}/superoffice/login/common/oauth/tokens",
        client_id=so.DEMO_CLIENT_ID,
        app_token=so.DEMO_APP_TOKEN,
    )
    await sim.post("/_sim/sessions/expire")
    with pytest.raises(BackendUnavailable, match="invalid_grant"):
        await backend.open_ticket(decision(), mail(), MemoryProgress())


async def test_soticket_reread_from_file_after_expiry(
    make: Make, sim: httpx.AsyncClient, tmp_path: Path
) -> None:
    (tmp_path / "soticket").write_text(so.DEMO_SOTICKET + "\n")
    backend = make(
        auth="soticket",
        username=None,
        password=None,
        ticket_file="soticket",  # relative to base_dir
        app_token=so.DEMO_APP_TOKEN,
    )
    await backend.open_ticket(decision(), mail(), MemoryProgress())
    await sim.post("/_sim/sessions/expire")
    # Nobody renewed the ticket: the backend's credentials are refused.
    with pytest.raises(BackendUnavailable, match="401"):
        await backend.open_ticket(decision(), mail(), MemoryProgress())
    # An external renewer (the system-user flow) writes a fresh ticket; the backend re-reads it.
    r = await sim.post(
        "/superoffice/login/api/PartnerSystemUser/Authenticate",
        json={
            "SignedSystemToken": so.DEMO_SYSTEM_USER_TOKEN,
            "ApplicationToken": so.DEMO_APP_TOKEN,
            "ContextIdentifier": so.CONTEXT_ID,
            "ReturnTokenType": "Text",
        },
    )
    (tmp_path / "soticket").write_text(r.json()["Token"])
    await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert len(await tickets(sim)) == 2


async def test_auth_fault_is_unavailable(make: Make, sim: httpx.AsyncClient) -> None:
    await fault(sim, "auth")
    with pytest.raises(BackendUnavailable):
        await make().open_ticket(decision(), mail(), MemoryProgress())
    with pytest.raises(BackendUnavailable):
        await make(password="wrong").ticket_status(TicketRef("rest", SYSTEM, "1", "1"))


async def test_reject_is_permanent_with_the_servers_message(
    make: Make, sim: httpx.AsyncClient
) -> None:
    await fault(sim, "reject")
    with pytest.raises(PermanentError, match="rejected by the service"):
        await make().open_ticket(decision(), mail(), MemoryProgress())


async def test_unknown_category_is_permanent(make: Make, sim: httpx.AsyncClient) -> None:
    with pytest.raises(PermanentError, match="Unknown category 99"):
        await make().open_ticket(decision(category=99), mail(), MemoryProgress())
    with pytest.raises(PermanentError, match="category must be"):
        await make().open_ticket(decision(category="sales"), mail(), MemoryProgress())
    assert await tickets(sim) == []


async def test_error_is_transient_with_retry_after(make: Make, sim: httpx.AsyncClient) -> None:
    await fault(sim, "error")
    with pytest.raises(TransientError) as info:
        await make().open_ticket(decision(), mail(), MemoryProgress())
    assert info.value.retry_after == 1.0


async def test_down_is_transient(make: Make, sim: httpx.AsyncClient) -> None:
    await fault(sim, "down")
    with pytest.raises(TransientError):
        await make().open_ticket(decision(), mail(), MemoryProgress())


async def test_slow_beyond_timeout_is_transient(make: Make, sim: httpx.AsyncClient) -> None:
    await fault(sim, "slow", latency_ms=1000)
    with pytest.raises(TransientError, match="timed out"):
        await make(timeout=0.2).open_ticket(decision(), mail(), MemoryProgress())


async def test_connection_refused_is_transient(make: Make) -> None:
    backend = make(url="http://127.0.0.1:9/superoffice")
    with pytest.raises(TransientError):
        await backend.open_ticket(decision(), mail(), MemoryProgress())


async def test_wrong_url_is_unavailable(make: Make, sims: Simulators) -> None:
    backend = make(url=f"{sims.base_url}/not-superoffice")
    with pytest.raises(BackendUnavailable, match="check the backend url"):
        await backend.open_ticket(decision(), mail(), MemoryProgress())


async def test_ticket_status(make: Make, sim: httpx.AsyncClient) -> None:
    backend = make()
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert await backend.ticket_status(ref) == "open"
    await sim.post(f"/_sim/tickets/{SYSTEM}/{ref.id}/close")
    assert await backend.ticket_status(ref) == "closed"
    with pytest.raises(PermanentError):
        await backend.ticket_status(TicketRef("rest", SYSTEM, "999999", "999999"))
    with pytest.raises(PermanentError):
        await backend.add_message(
            TicketRef("rest", SYSTEM, "999999", "999999"), mail(), MemoryProgress()
        )
    with pytest.raises(PermanentError):
        await backend.ticket_status(TicketRef("rest", SYSTEM, "abc", "abc"))


async def test_find_existing(make: Make, sim: httpx.AsyncClient) -> None:
    backend = make()
    assert await backend.find_existing(decision(), mail()) is None
    ref = await backend.open_ticket(decision(), mail(subject="It's on fire"), MemoryProgress())
    found = await backend.find_existing(decision(), mail(subject="It's on fire"))
    assert found == ref
    assert await backend.find_existing(decision(), mail(subject="Something else")) is None


def test_config_needs_credentials_for_its_scheme() -> None:
    def cfg(**keys: Any) -> SuperOfficeRestConfig:
        raw = {"type": SYSTEM, "url": "http://127.0.0.1:1/superoffice", **keys}
        return SuperOfficeRestConfig.model_validate(raw)

    with pytest.raises(pydantic.ValidationError, match="username and password"):
        cfg(auth="basic", username="u")
    with pytest.raises(pydantic.ValidationError, match="ticket and app_token"):
        cfg(auth="soticket", ticket="t")
    with pytest.raises(pydantic.ValidationError, match="token_url"):
        cfg(auth="bearer", refresh_token="r")
    with pytest.raises(pydantic.ValidationError):
        cfg(auth="basic", username="u", password="p", bogus=1)
    assert cfg(auth="basic", username="u", password_env="SO_TEST_PW").notify is False
    shown = cfg(auth="basic", username="u", password="s3cr3t-value")
    assert "s3cr3t-value" not in repr(shown) and "s3cr3t-value" not in str(shown)


def test_validate_ticket_fields() -> None:
    ok = {"category": 2, "priority": 1, "slevel": "external", "person": "lookup", "notify": True}
    assert validate_ticket_fields(ok) == []
    assert validate_ticket_fields({"slevel": 1, "person": 7}) == []
    problems = validate_ticket_fields(
        {"category": "x", "slevel": "secret", "person": "bob", "notify": "yes", "deptid": 2}
    )
    assert len(problems) == 5


@pytest.mark.parametrize("concurrency", [1, 2])
async def test_concurrent_calls_share_one_refresh(
    make: Make, sim: httpx.AsyncClient, concurrency: int
) -> None:
    sims_url = str(sim.base_url).rstrip("/")
    backend = make(
        auth="bearer",
        username=None,
        password=None,
        token=so.DEMO_TOKEN,
        refresh_token=so.DEMO_REFRESH_TOKEN,
        token_url=f"{sims_url}/superoffice/login/common/oauth/tokens",
        client_id=so.DEMO_CLIENT_ID,
        app_token=so.DEMO_APP_TOKEN,
        concurrency=concurrency,
    )
    await sim.post("/_sim/sessions/expire")
    before = await calls(sim)
    mails = [mail(message_id=f"m{i}@example.org", subject=f"Fire {i}") for i in range(6)]
    refs = await asyncio.gather(
        *(backend.open_ticket(decision(), m, MemoryProgress()) for m in mails)
    )
    assert len({r.id for r in refs}) == 6
    # 6 tickets x 4 calls, the person lookups of the cold cache, the calls refused before the
    # refresh (at most `concurrency` in flight) and one token refresh.
    assert await calls(sim) - before <= 6 * 4 + 6 + concurrency + 1


def test_retry_after_forms() -> None:
    assert _retry_after("3") == 3.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=120), usegmt=True)
    value = _retry_after(later)
    assert value is not None and 100 < value <= 120
