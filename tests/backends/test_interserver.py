"""InterServerBackend against the InterServer simulator on loopback (no mocks)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from gateway.backends.base import MemoryProgress
from gateway.backends.interserver import (
    InterServerBackend,
    InterServerConfig,
    originating_ip,
)
from gateway.errors import BackendUnavailable, PermanentError, TransientError
from gateway.models import Attachment, Decision, ParsedMail, TicketRef
from gateway.simulators import interserver as sim
from gateway.simulators.server import Simulators
from gateway.simulators.state import ACCOUNT_EMAIL, PASSWORD

Make = Callable[..., InterServerBackend]


@pytest.fixture
async def make(sims: Simulators, tmp_path: Path) -> AsyncIterator[Make]:
    made: list[InterServerBackend] = []

    def factory(**overrides: Any) -> InterServerBackend:
        keys: dict[str, Any] = {
            "type": "interserver",
            "url": f"{sims.base_url}{sim.PATH}",
            "username": ACCOUNT_EMAIL,
            "password": PASSWORD,
            "timeout": 5,
            **overrides,
        }
        cfg = InterServerConfig.model_validate(keys)
        backend = InterServerBackend("hosting", cfg, base_dir=tmp_path)
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        await backend.aclose()


@pytest.fixture
def backend(make: Make) -> InterServerBackend:
    return make()


def mail(
    subject: str = "Server down",
    text: str = "My VPS does not answer since 10:00.",
    headers: tuple[tuple[str, str], ...] = (),
    **kw: Any,
) -> ParsedMail:
    return ParsedMail(
        message_id="m1@example.org",
        subject=subject,
        from_addr="alice@example.org",
        from_name="Alice Example",
        to=("hosting@example.com",),
        date="Mon, 1 Jan 2024 10:00:00 +0000",
        headers=headers,
        text=text,
        **kw,
    )


def decision(**ticket: Any) -> Decision:
    return Decision(rule="hosting", backend="hosting", action="new", ticket=ticket)


async def tickets(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    resp = await http.get("/_sim/tickets", params={"system": "interserver"})
    return list(resp.json())


async def calls(http: httpx.AsyncClient) -> int:
    return int((await http.get("/_sim/calls")).json()["interserver"])


async def fault(http: httpx.AsyncClient, **body: Any) -> None:
    resp = await http.post("/_sim/fault", json={"system": "interserver", **body})
    assert resp.status_code == 200, resp.text


# ---------------------------------------------------------------- new tickets


async def test_open_ticket_with_x_originating_ip(
    backend: InterServerBackend, http: httpx.AsyncClient
) -> None:
    m = mail(headers=(("X-Originating-IP", "[203.0.113.9]"), ("Subject", "Server down")))
    progress = MemoryProgress()
    ref = await backend.open_ticket(decision(product="VPS 42"), m, progress)

    assert ref == TicketRef(backend="hosting", system="interserver", id=ref.id, ref=ref.id)
    assert int(ref.id) > 0
    assert progress.begun == ["openTicket"]
    assert progress.data["openTicket"] == {"id": ref.id}
    (t,) = await tickets(http)
    assert t["id"] == ref.id
    assert t["title"] == "Server down"
    assert t["requester"] == ACCOUNT_EMAIL
    assert t["fields"] == {
        "user_email": ACCOUNT_EMAIL,
        "user_ip": "203.0.113.9",
        "product": "VPS 42",
        "box_auth_value": "",
    }
    body = t["messages"][0]["body"]
    assert body.startswith("From: Alice Example <alice@example.org>\n")
    assert body.endswith("My VPS does not answer since 10:00.")


async def test_open_ticket_with_ip_from_received(make: Make, http: httpx.AsyncClient) -> None:
    backend = make(default_product="Shared hosting")
    received = (
        ("Received", "from mx.example.org (mx.example.org [198.51.100.20]) by mx.example.com"),
        ("Received", "from laptop ([198.51.100.77]) by mx.example.org with ESMTPSA; Mon"),
        ("Received", "from [192.168.1.20] (helo=laptop) by laptop; Mon"),
    )
    ref = await backend.open_ticket(
        decision(box_auth_value="abc"), mail(headers=received), MemoryProgress()
    )
    (t,) = await tickets(http)
    assert t["id"] == ref.id
    assert t["fields"]["user_ip"] == "198.51.100.77"
    assert t["fields"]["product"] == "Shared hosting"
    assert t["fields"]["box_auth_value"] == "abc"


def test_originating_ip_order() -> None:
    assert originating_ip(mail()) == "127.0.0.1"
    assert originating_ip(mail(headers=(("X-Gateway-Peer", "192.0.2.55"),))) == "192.0.2.55"
    private_only = (
        ("Received", "from a ([10.1.2.3]) by b"),
        ("X-Originating-IP", "[192.168.0.9]"),
        ("X-Gateway-Peer", "127.0.0.1"),
    )
    assert originating_ip(mail(headers=private_only)) == "127.0.0.1"
    v6 = (("Received", "from host (host [IPv6:2001:db8::5]) by mx (Postfix) with ESMTPS"),)
    assert originating_ip(mail(headers=v6)) == "2001:db8::5"
    # only the from-clause counts, not the receiving host after "by"
    by_only = (("Received", "from localhost by mx [198.51.100.1]; Mon"),)
    assert originating_ip(mail(headers=by_only)) == "127.0.0.1"
    both = (("X-Originating-IP", "198.51.100.3"), ("Received", "from x ([198.51.100.4]) by y"))
    assert originating_ip(mail(headers=both)) == "198.51.100.3"


async def test_body_names_attachments_and_survives_control_chars(
    backend: InterServerBackend, http: httpx.AsyncClient
) -> None:
    att = Attachment(filename="invoice.pdf", content_type="application/pdf", data=b"%PDF")
    m = mail(subject="", text="bad \x00 byte\x07 here", attachments=(att,))
    await backend.open_ticket(decision(), m, MemoryProgress())
    (t,) = await tickets(http)
    assert t["title"] == "(no subject)"
    body = t["messages"][0]["body"]
    assert "bad  byte here" in body
    assert (
        "Attachments not forwarded (1): invoice.pdf (InterServer's API takes no attachments)"
        in body
    )


async def test_wrong_account_email_is_permanent(make: Make, http: httpx.AsyncClient) -> None:
    backend = make(account_email="someone-else@example.com")
    progress = MemoryProgress()
    with pytest.raises(PermanentError) as err:
        await backend.open_ticket(decision(), mail(), progress)
    assert "Invalid Email Address - Does not match your account email!" in str(err.value)
    assert "openTicket" not in progress.data
    assert await tickets(http) == []


async def test_reject_is_permanent(backend: InterServerBackend, http: httpx.AsyncClient) -> None:
    await fault(http, mode="reject")
    with pytest.raises(PermanentError) as err:
        await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert sim.REJECT_OPEN in str(err.value)


# ---------------------------------------------------------------- credentials and sessions


async def test_wrong_password_is_backend_unavailable(make: Make) -> None:
    backend = make(password="not-the-password")
    with pytest.raises(BackendUnavailable):
        await backend.open_ticket(decision(), mail(), MemoryProgress())


async def test_auth_fault_is_backend_unavailable(
    backend: InterServerBackend, http: httpx.AsyncClient
) -> None:
    await backend.open_ticket(decision(), mail(), MemoryProgress())  # session cached
    await fault(http, mode="auth")
    with pytest.raises(BackendUnavailable):
        await backend.open_ticket(decision(), mail(), MemoryProgress())
    await fault(http, mode="ok")
    await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert len(await tickets(http)) == 2


async def test_session_is_renewed_once(
    backend: InterServerBackend, http: httpx.AsyncClient
) -> None:
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert await calls(http) == 2  # api_login + api_openTicket
    await http.post("/_sim/sessions/expire")
    await backend.add_message(ref, mail(text="Still down."), MemoryProgress())
    assert await calls(http) == 5  # refused post, api_login, post
    (t,) = await tickets(http)
    assert len(t["messages"]) == 2
    await backend.add_message(ref, mail(text="Again."), MemoryProgress())
    assert await calls(http) == 6  # the renewed session is cached


async def test_concurrent_calls_share_one_login(make: Make, http: httpx.AsyncClient) -> None:
    backend = make(concurrency=2)
    refs = await asyncio.gather(
        *(
            backend.open_ticket(decision(), mail(subject=f"S{n}"), MemoryProgress())
            for n in range(6)
        )
    )
    assert len({r.id for r in refs}) == 6
    assert await calls(http) == 7


# ---------------------------------------------------------------- temporary failures


async def test_error_fault_is_transient(
    backend: InterServerBackend, http: httpx.AsyncClient
) -> None:
    await fault(http, mode="error", count=1)
    with pytest.raises(TransientError) as err:
        await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert "503" in str(err.value)
    await backend.open_ticket(decision(), mail(), MemoryProgress())


async def test_down_is_transient(backend: InterServerBackend, http: httpx.AsyncClient) -> None:
    await fault(http, mode="down")
    with pytest.raises(TransientError):
        await backend.open_ticket(decision(), mail(), MemoryProgress())


async def test_slow_is_a_transient_timeout(make: Make, http: httpx.AsyncClient) -> None:
    backend = make(timeout=0.2)
    await fault(http, mode="slow", latency_ms=1000, count=1)
    with pytest.raises(TransientError) as err:
        await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert "no answer" in str(err.value)


async def test_refused_connection_is_transient(make: Make) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = make(url=f"http://127.0.0.1:{port}/interserver/api.php")
    with pytest.raises(TransientError):
        await backend.open_ticket(decision(), mail(), MemoryProgress())


async def test_wrong_url_is_backend_unavailable(make: Make, sims: Simulators) -> None:
    backend = make(url=f"{sims.base_url}/no/such/api.php")
    with pytest.raises(BackendUnavailable):
        await backend.open_ticket(decision(), mail(), MemoryProgress())


# ---------------------------------------------------------------- follow-ups and status


async def test_add_message_to_a_ticket_made_elsewhere(
    backend: InterServerBackend, http: httpx.AsyncClient
) -> None:
    made = {"system": "interserver", "id": "5001", "title": "Old", "requester": "c@example.org"}
    assert (await http.post("/_sim/tickets", json=made)).status_code == 201
    ref = TicketRef(backend="hosting", system="interserver", id="5001", ref="5001")
    progress = MemoryProgress()
    await backend.add_message(ref, mail(text="Out of office"), progress, automatic=True)
    assert progress.begun == ["ticketPost"]
    assert "ticketPost" in progress.data
    (t,) = await tickets(http)
    (msg,) = t["messages"]
    assert msg["body"].startswith("[automatic reply")
    assert "From: Alice Example <alice@example.org>" in msg["body"]
    assert msg["body"].endswith("Out of office")


async def test_add_message_to_unknown_ticket_is_permanent(backend: InterServerBackend) -> None:
    ref = TicketRef(backend="hosting", system="interserver", id="424242", ref="424242")
    with pytest.raises(PermanentError) as err:
        await backend.add_message(ref, mail(), MemoryProgress())
    assert "Error loading ticket details!" in str(err.value)


async def test_ticket_status(backend: InterServerBackend, http: httpx.AsyncClient) -> None:
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert await backend.ticket_status(ref) == "open"
    await http.post(f"/_sim/tickets/interserver/{ref.id}/close")
    assert await backend.ticket_status(ref) == "closed"
    missing = TicketRef(backend="hosting", system="interserver", id="999999", ref="999999")
    with pytest.raises(PermanentError):
        await backend.ticket_status(missing)


# ---------------------------------------------------------------- crash recovery


async def test_find_existing(make: Make, http: httpx.AsyncClient) -> None:
    first = make()
    m = mail(subject="Uncertain create")
    ref = await first.open_ticket(decision(), m, MemoryProgress())
    await first.open_ticket(decision(), mail(subject="Another one"), MemoryProgress())

    after_restart = make()
    assert await after_restart.find_existing(decision(), m) == ref
    # same subject, other sender or text: not ours
    other = mail(subject="Uncertain create", text="A different problem.")
    assert await after_restart.find_existing(decision(), other) is None
    assert await after_restart.find_existing(decision(), mail(subject="Never sent")) is None


async def test_find_existing_across_pages(backend: InterServerBackend) -> None:
    target = mail(subject="Oldest")
    ref = await backend.open_ticket(decision(), target, MemoryProgress())
    for n in range(55):  # more than one list page of 50
        await backend.open_ticket(decision(), mail(subject=f"Filler {n}"), MemoryProgress())
    assert await backend.find_existing(decision(), target) == ref


async def test_resume_from_progress(backend: InterServerBackend, http: httpx.AsyncClient) -> None:
    progress = MemoryProgress({"openTicket": {"id": "1234"}})
    ref = await backend.open_ticket(decision(), mail(), progress)
    assert ref.id == ref.ref == "1234"
    await backend.add_message(ref, mail(), MemoryProgress({"ticketPost": {}}))
    assert await calls(http) == 0
    assert progress.begun == []


# ---------------------------------------------------------------- config


def test_config_needs_a_password_source() -> None:
    base = {"type": "interserver", "url": "http://127.0.0.1/", "username": ACCOUNT_EMAIL}
    with pytest.raises(ValidationError):
        InterServerConfig.model_validate(base)
    with pytest.raises(ValidationError):
        InterServerConfig.model_validate({**base, "pasword": "x"})  # extra keys are refused
    cfg = InterServerConfig.model_validate({**base, "password": "s3cr3t-value"})
    assert cfg.user_email == ACCOUNT_EMAIL
    assert "s3cr3t-value" not in repr(cfg)
    other = InterServerConfig.model_validate({**base, "password_env": "X", "account_email": "a@b"})
    assert other.user_email == "a@b"


async def test_password_from_file_and_env(
    make: Make, tmp_path: Path, http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "interserver.key").write_text(PASSWORD + "\n")
    from_file = make(password=None, password_file="interserver.key")
    await from_file.open_ticket(decision(), mail(), MemoryProgress())
    monkeypatch.setenv("IS_TEST_KEY", PASSWORD)
    from_env = make(password=None, password_env="IS_TEST_KEY")
    await from_env.open_ticket(decision(), mail(), MemoryProgress())
    assert len(await tickets(http)) == 2
