"""WhmcsBackend against the WHMCS simulator on loopback: tickets, follow-ups, errors, recovery."""

from __future__ import annotations

import asyncio
import base64
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.backends.base import MemoryProgress
from gateway.backends.whmcs import (
    WhmcsBackend,
    WhmcsConfig,
    api_url,
    encode_customfields,
)
from gateway.errors import BackendUnavailable, PermanentError, TransientError
from gateway.logs import event_text
from gateway.models import Attachment, Decision, ParsedMail, TicketRef
from gateway.simulators import whmcs as sim
from gateway.simulators.server import Simulators

MakeBackend = Callable[..., WhmcsBackend]


@pytest.fixture
async def make(sims: Simulators, tmp_path: Path) -> AsyncIterator[MakeBackend]:
    made: list[WhmcsBackend] = []

    def factory(**overrides: Any) -> WhmcsBackend:
        cfg: dict[str, Any] = {
            "type": "whmcs",
            "url": sims.base_url + "/whmcs",
            "identifier": sim.IDENTIFIER,
            "secret": sim.SECRET,
            "timeout": 5,
        }
        cfg.update(overrides)
        backend = WhmcsBackend("billing", WhmcsConfig.model_validate(cfg), base_dir=tmp_path)
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        await backend.aclose()


@pytest.fixture
def backend(make: MakeBackend) -> WhmcsBackend:
    return make()


async def fault(sims: Simulators, mode: str, **extra: Any) -> None:
    async with httpx.AsyncClient(base_url=sims.base_url) as http:
        resp = await http.post("/_sim/fault", json={"system": "whmcs", "mode": mode, **extra})
        resp.raise_for_status()


def tickets(sims: Simulators) -> list[Any]:
    return [t for t in sims.state.tickets if t.system == "whmcs"]


def mail(**overrides: Any) -> ParsedMail:
    values: dict[str, Any] = {
        "message_id": "m1@example.org",
        "subject": "Invoice 42 is wrong",
        "from_addr": "jane@example.org",
        "from_name": "Jane Doe",
        "to": ("billing@example.com",),
        "date": "Mon, 23 Nov 2026 10:00:00 +0000",
        "text": "The total should be 10 EUR.",
    }
    values.update(overrides)
    return ParsedMail(**values)


def decision(**ticket: Any) -> Decision:
    return Decision(rule="billing", backend="billing", action="new", ticket=ticket)


async def test_open_ticket_id_differs_from_tid(sims: Simulators, backend: WhmcsBackend) -> None:
    progress = MemoryProgress()
    ref = await backend.open_ticket(decision(), mail(), progress)
    assert (ref.backend, ref.system) == ("billing", "whmcs")
    assert ref.id != ref.ref
    assert progress.begun == ["OpenTicket"]
    assert progress.data["OpenTicket"] == {"id": ref.id, "tid": ref.ref}
    [t] = tickets(sims)
    assert (t.id, t.ref, t.title, t.requester) == (
        ref.id,
        ref.ref,
        "Invoice 42 is wrong",
        "jane@example.org",
    )
    # Defaults: department 1, Medium, guest name + e-mail (no client), WHMCS's mail turned off.
    assert t.fields["deptid"] == "1" and t.fields["priority"] == "Medium"
    assert (t.fields["name"], t.fields["email"]) == ("Jane Doe", "jane@example.org")
    assert t.fields["noemail"] is True
    assert sims.state.outbox == []
    body = t.messages[0].body
    assert body.startswith("From: Jane Doe <jane@example.org>")
    assert "The total should be 10 EUR." in body


async def test_rule_fields_reach_whmcs(sims: Simulators, backend: WhmcsBackend) -> None:
    d = decision(
        deptid=2, priority="High", customfields={"1": "Google", 3: "Zürich", 4: True}, noemail=False
    )
    ref = await backend.open_ticket(d, mail(), MemoryProgress())
    [t] = tickets(sims)
    assert t.fields["deptid"] == "2" and t.fields["priority"] == "High"
    assert t.fields["customfields"] == {"1": "Google", "3": "Zürich", "4": "on"}
    assert t.fields["noemail"] is False
    # Without noemail WHMCS confirms by itself: the customer would get two acknowledgements.
    assert [m["rcpt_tos"] for m in sims.state.outbox] == [["jane@example.org"]]
    assert ref.ref in sims.state.outbox[0]["subject"]


async def test_config_defaults_apply(sims: Simulators, make: MakeBackend) -> None:
    backend = make(default_deptid=3, default_priority="Low", noemail=False, markdown=True)
    await backend.open_ticket(decision(), mail(), MemoryProgress())
    [t] = tickets(sims)
    assert (t.fields["deptid"], t.fields["priority"]) == ("3", "Low")
    assert t.fields["noemail"] is False and t.fields["markdown"] is True


async def test_attachments_forwarded_and_blocked_listed(
    sims: Simulators, backend: WhmcsBackend
) -> None:
    m = mail(
        attachments=(
            Attachment("report.pdf", "application/pdf", b"%PDF-1.4 data"),
            Attachment("tool.exe", "application/octet-stream", b"MZ"),
            Attachment("logo.png", "image/png", b"png", inline=True, content_id="logo"),
        )
    )
    await backend.open_ticket(decision(), m, MemoryProgress())
    [t] = tickets(sims)
    # the inline image goes as a file: the ticket text cannot show it where it stood
    assert t.fields["attachments"] == [
        {"name": "report.pdf", "size": 13},
        {"name": "logo.png", "size": 3},
    ]
    assert t.messages[0].attachments == ["report.pdf", "logo.png"]
    assert "tool.exe (blocked type)" in t.messages[0].body


async def test_client_lookup_by_sender_is_cached(sims: Simulators, backend: WhmcsBackend) -> None:
    async with httpx.AsyncClient(base_url=sims.base_url) as http:
        await http.post(
            "/_sim/clients",
            json={"system": "whmcs", "email": "Jane@Example.org", "id": "7", "name": "Jane Doe"},
        )
    before = sims.state.calls["whmcs"]
    await backend.open_ticket(decision(client="lookup", serviceid=5), mail(), MemoryProgress())
    await backend.open_ticket(decision(), mail(subject="second"), MemoryProgress())
    assert sims.state.calls["whmcs"] - before == 3  # one GetClientsDetails, two OpenTicket
    first, second = tickets(sims)
    assert first.fields["clientid"] == "7" and first.fields["serviceid"] == "5"
    assert second.fields["clientid"] == "7" and "name" not in second.fields


async def test_unknown_sender_becomes_guest(
    sims: Simulators, make: MakeBackend, caplog: pytest.LogCaptureFixture
) -> None:
    backend = make()
    with caplog.at_level("INFO", logger="gateway.backend"):
        await backend.open_ticket(decision(client="lookup"), mail(), MemoryProgress())
    [t] = tickets(sims)
    assert "clientid" not in t.fields and t.fields["email"] == "jane@example.org"
    # "Client Not Found" is the normal answer for a new sender: no whmcs_error in the log
    events = " ".join(event_text(r) for r in caplog.records)
    assert "event=whmcs_client_lookup" in events and "found=False" in events
    assert "whmcs_error" not in events


async def test_explicit_client_id_and_lookup_off(sims: Simulators, make: MakeBackend) -> None:
    async with httpx.AsyncClient(base_url=sims.base_url) as http:
        await http.post(
            "/_sim/clients",
            json={"system": "whmcs", "email": "acct@example.org", "id": "9", "name": "Account"},
        )
        await http.post(
            "/_sim/clients",
            json={"system": "whmcs", "email": "jane@example.org", "id": "7", "name": "Jane"},
        )
    backend = make(client_lookup=False)
    await backend.open_ticket(decision(client=9), mail(), MemoryProgress())
    await backend.open_ticket(decision(), mail(), MemoryProgress())
    first, second = tickets(sims)
    assert first.fields["clientid"] == "9" and first.requester == "acct@example.org"
    assert "clientid" not in second.fields  # lookup off: a guest ticket


async def test_follow_up_with_add_ticket_reply(sims: Simulators, backend: WhmcsBackend) -> None:
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    progress = MemoryProgress()
    reply = mail(
        subject=f"Re: [Ticket #{ref.ref}]",
        text="Any news?",
        attachments=(Attachment("a.txt", "text/plain", b"abc"),),
    )
    await backend.add_message(ref, reply, progress)
    assert progress.begun == ["AddTicketReply"]
    [t] = tickets(sims)
    assert len(t.messages) == 2
    assert "Any news?" in t.messages[1].body
    assert t.messages[1].author == "guest:jane@example.org"  # a guest's ticket: guest reply
    assert t.messages[1].fields["name"] == "Jane Doe"
    assert t.messages[1].fields["noemail"] is True  # as on OpenTicket (config noemail)
    assert t.messages[1].attachments == ["a.txt"]
    await backend.add_message(ref, mail(text="auto"), MemoryProgress(), automatic=True)
    assert t.messages[2].body.startswith("[automatic reply")


async def test_follow_up_to_a_ticket_known_only_by_tid(
    sims: Simulators, backend: WhmcsBackend
) -> None:
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    foreign = TicketRef("billing", "whmcs", ref.ref, ref.ref)  # subject token of another origin
    await backend.add_message(foreign, mail(text="more"), MemoryProgress())
    [t] = tickets(sims)
    assert len(t.messages) == 2
    assert await backend.ticket_status(foreign) == "open"


async def test_follow_up_to_missing_ticket_is_permanent(backend: WhmcsBackend) -> None:
    with pytest.raises(PermanentError, match="Ticket ID Not Found"):
        await backend.add_message(
            TicketRef("billing", "whmcs", "424242", "ZZZ-000000"), mail(), MemoryProgress()
        )


async def test_ticket_status(sims: Simulators, backend: WhmcsBackend) -> None:
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert await backend.ticket_status(ref) == "open"
    async with httpx.AsyncClient(base_url=sims.base_url) as http:
        await http.post(f"/_sim/tickets/whmcs/{ref.id}/close")
    assert await backend.ticket_status(ref) == "closed"
    with pytest.raises(PermanentError):
        await backend.ticket_status(TicketRef("billing", "whmcs", "999999", "NOP-000000"))


async def test_find_existing(sims: Simulators, backend: WhmcsBackend) -> None:
    assert await backend.find_existing(decision(), mail()) is None
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    # Another ticket with the same subject but another text must not be taken for it.
    await backend.open_ticket(decision(), mail(text="something else"), MemoryProgress())
    assert await backend.find_existing(decision(), mail()) == ref
    assert await backend.find_existing(decision(), mail(text="third text")) is None
    assert await backend.find_existing(decision(), mail(from_addr="x@example.org")) is None


async def test_find_existing_for_a_client(sims: Simulators, backend: WhmcsBackend) -> None:
    async with httpx.AsyncClient(base_url=sims.base_url) as http:
        await http.post(
            "/_sim/clients",
            json={"system": "whmcs", "email": "jane@example.org", "id": "7", "name": "Jane Doe"},
        )
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert tickets(sims)[0].fields["clientid"] == "7"
    assert await backend.find_existing(decision(), mail()) == ref


async def test_resume_from_progress_makes_no_call(sims: Simulators, backend: WhmcsBackend) -> None:
    before = sims.state.calls["whmcs"]
    progress = MemoryProgress({"OpenTicket": {"id": "1001", "tid": "ABC-123456"}})
    ref = await backend.open_ticket(decision(), mail(), progress)
    assert ref == TicketRef("billing", "whmcs", "1001", "ABC-123456")
    await backend.add_message(ref, mail(), MemoryProgress({"AddTicketReply": {"ticketid": "1"}}))
    assert sims.state.calls["whmcs"] == before and progress.begun == []


async def test_auth_fault_is_backend_unavailable(sims: Simulators, backend: WhmcsBackend) -> None:
    await fault(sims, "auth")
    with pytest.raises(BackendUnavailable, match="Authentication Failed"):
        await backend.open_ticket(decision(), mail(), MemoryProgress())


async def test_wrong_secret_is_backend_unavailable(make: MakeBackend) -> None:
    with pytest.raises(BackendUnavailable):
        await make(secret="wrong").open_ticket(decision(), mail(), MemoryProgress())


async def test_ip_restriction_and_access_key(sims: Simulators, make: MakeBackend) -> None:
    async with httpx.AsyncClient(base_url=sims.base_url) as http:
        await http.post("/_sim/whmcs/access", json={"allowed_ips": ["192.0.2.1"]})
    with pytest.raises(BackendUnavailable, match=r"Invalid IP 127\.0\.0\.1"):
        await make().open_ticket(decision(), mail(), MemoryProgress())
    ref = await make(accesskey=sim.ACCESS_KEY).open_ticket(decision(), mail(), MemoryProgress())
    assert ref.ref


async def test_reject_is_permanent_with_whmcs_message(sims: Simulators, make: MakeBackend) -> None:
    await fault(sims, "reject")
    with pytest.raises(PermanentError, match="Department ID not found"):
        await make(client_lookup=False).open_ticket(decision(), mail(), MemoryProgress())


async def test_unknown_department_is_permanent(backend: WhmcsBackend) -> None:
    with pytest.raises(PermanentError, match="Department ID not found"):
        await backend.open_ticket(decision(deptid=77), mail(), MemoryProgress())


async def test_invalid_rule_fields_are_permanent(backend: WhmcsBackend) -> None:
    with pytest.raises(PermanentError, match="priority"):
        await backend.open_ticket(decision(priority="Urgent"), mail(), MemoryProgress())
    with pytest.raises(PermanentError, match="category"):
        await backend.open_ticket(decision(category=3), mail(), MemoryProgress())


async def test_server_error_is_transient_with_retry_after(
    sims: Simulators, backend: WhmcsBackend
) -> None:
    await fault(sims, "error", count=1)
    with pytest.raises(TransientError) as info:
        await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert info.value.retry_after == 1.0
    assert (await backend.open_ticket(decision(), mail(), MemoryProgress())).ref


async def test_down_is_transient(sims: Simulators, backend: WhmcsBackend) -> None:
    await fault(sims, "down")
    with pytest.raises(TransientError, match="connection"):
        await backend.ticket_status(TicketRef("billing", "whmcs", "1", "A"))


async def test_connection_refused_is_transient(make: MakeBackend) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = make(url=f"http://127.0.0.1:{port}/whmcs")
    with pytest.raises(TransientError):
        await backend.open_ticket(decision(), mail(), MemoryProgress())


async def test_timeout_is_transient(sims: Simulators, make: MakeBackend) -> None:
    await fault(sims, "slow", latency_ms=1000)
    with pytest.raises(TransientError, match="timeout"):
        await make(timeout=0.2, client_lookup=False).open_ticket(
            decision(), mail(), MemoryProgress()
        )


async def test_wrong_path_is_backend_unavailable(sims: Simulators, make: MakeBackend) -> None:
    backend = make(url=sims.base_url + "/not-whmcs/api.php")
    with pytest.raises(BackendUnavailable, match="HTTP 404"):
        await backend.open_ticket(decision(), mail(), MemoryProgress())


async def test_concurrency_is_bounded(sims: Simulators, make: MakeBackend) -> None:
    backend = make(concurrency=2, client_lookup=False)
    await fault(sims, "slow", latency_ms=200)
    started = asyncio.get_running_loop().time()
    await asyncio.gather(
        *(
            backend.open_ticket(decision(), mail(subject=f"s{i}"), MemoryProgress())
            for i in range(4)
        )
    )
    assert asyncio.get_running_loop().time() - started >= 0.39  # two rounds of two calls
    assert len(tickets(sims)) == 4


async def test_secret_from_file_and_env(
    sims: Simulators, make: MakeBackend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "whmcs.secret").write_text(sim.SECRET + "\n")
    backend = make(secret=None, secret_file="whmcs.secret")
    assert (await backend.open_ticket(decision(), mail(), MemoryProgress())).ref
    monkeypatch.setenv("WHMCS_SECRET", sim.SECRET)
    backend = make(secret=None, secret_env="WHMCS_SECRET")
    assert (await backend.open_ticket(decision(), mail(), MemoryProgress())).ref
    assert sim.SECRET not in repr(backend.cfg)


def test_customfields_encoding_round_trips_through_the_simulator() -> None:
    encoded = encode_customfields({1: "Google", 12: "Zürich €", 3: False})
    assert base64.b64decode(encoded).startswith(b'a:3:{i:1;s:6:"Google";i:12;s:11:')
    assert sim.decode_customfields(encoded) == {"1": "Google", "12": "Zürich €", "3": ""}


def test_api_url() -> None:
    assert api_url("https://h/whmcs/") == "https://h/whmcs/includes/api.php"
    assert api_url("https://h/billing/includes/api.php") == "https://h/billing/includes/api.php"


def test_streamed_attachments_field_is_the_form_encoding_of_encode_attachments() -> None:
    import os
    from urllib.parse import urlencode

    from gateway.backends.whmcs import attachments_form_value, encode_attachments

    for sizes in ([0], [1], [5, 7], [3 * 65536 * 2 + 5, 100, 1_000_001]):
        atts = [
            Attachment(f"f{i}é.bin", "application/octet-stream", os.urandom(n))
            for i, n in enumerate(sizes)
        ]
        whole = urlencode({"attachments": encode_attachments(atts)}).split("=", 1)[1]
        pieces = list(attachments_form_value(atts))
        assert b"".join(pieces) == whole.encode()
        assert max(len(p) for p in pieces) < 1024 * 1024  # never the whole at once


# -- as WHMCS/developer-docs describe it (issue 16) ------------------------------------------------


async def add_client(sims: Simulators, email: str, client_id: str, name: str) -> None:
    async with httpx.AsyncClient(base_url=sims.base_url) as http:
        body = {"system": "whmcs", "email": email, "id": client_id, "name": name}
        (await http.post("/_sim/clients", json=body)).raise_for_status()


async def test_reply_of_a_client_to_its_ticket_is_a_client_reply(
    sims: Simulators, make: MakeBackend
) -> None:
    await add_client(sims, "jane@example.org", "7", "Jane Doe")
    backend = make(markdown=True)
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    assert await backend.ticket_status(ref) == "open"  # as the worker asks before a follow-up
    await backend.add_message(ref, mail(text="Any news?"), MemoryProgress())
    # a colleague writing on the same ticket is not the client
    await backend.add_message(
        ref, mail(from_addr="bob@example.org", from_name="Bob", text="Me too"), MemoryProgress()
    )
    [t] = tickets(sims)
    first, client_reply, colleague = t.messages
    assert first.author == "client:7"
    assert client_reply.author == "client:7"
    assert client_reply.fields == {"clientid": "7", "noemail": True, "markdown": True}
    assert "name" not in client_reply.fields and "email" not in client_reply.fields
    assert colleague.author == "guest:bob@example.org"
    assert colleague.fields["name"] == "Bob"


async def test_markdown_and_noemail_on_replies(sims: Simulators, make: MakeBackend) -> None:
    backend = make(markdown=True, noemail=False)
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    await backend.add_message(ref, mail(text="again"), MemoryProgress())
    [t] = tickets(sims)
    assert t.fields["markdown"] is True
    assert t.messages[1].fields["markdown"] is True
    assert t.messages[1].fields["noemail"] is False


async def test_custom_closed_status_from_config(sims: Simulators, make: MakeBackend) -> None:
    backend = make(closed_statuses=["Closed", "Resolved"])
    ref = await backend.open_ticket(decision(), mail(), MemoryProgress())
    async with httpx.AsyncClient(base_url=sims.base_url) as http:
        resp = await http.post(f"/_sim/tickets/whmcs/{ref.id}/close", json={"status": "Resolved"})
        assert resp.json()["status"] == "Resolved"
    assert await backend.ticket_status(ref) == "closed"
    # without the config key the installation is asked; its documented answer (title and count)
    # only names "Closed" as closed for sure
    default = make()
    assert await default.closed_statuses() == frozenset({"closed"})
    assert await default.ticket_status(ref) == "open"
    before = sims.state.calls["whmcs"]
    await default.closed_statuses()
    assert sims.state.calls["whmcs"] == before  # cached for an hour


async def test_closed_statuses_fall_back_to_closed(sims: Simulators, backend: WhmcsBackend) -> None:
    await fault(sims, "error", count=1)
    assert await backend.closed_statuses() == frozenset({"closed"})
