"""The `Spool` protocol's contract, run against both engines: SQLite (a file) and PostgreSQL (a
private cluster started by tests/pg_server.py). Every engine must pass every test here; what only
one engine has (SQLite's blob I/O, migrations of its file) is tested beside it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import SpoolError
from gateway.models import Envelope
from gateway.spool import Spool, SpoolSettings, open_spool
from gateway.spool.base import (
    AckDraft,
    AckLimits,
    Outcome,
    RetentionPolicy,
    State,
    ThreadHit,
    TicketInfo,
)

ENV = Envelope(mail_from="a@example.org", rcpt_tos=("support@example.com",), peer="127.0.0.1")
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


Opener = Callable[..., Awaitable[Spool]]


@pytest.fixture(params=["sqlite", "postgresql"])
async def open_(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """`await open_(node=..., worker=..., lease=...)`: one more process's view of ONE spool."""
    opened: list[Spool] = []
    clock = Clock()
    if request.param == "sqlite":
        where: dict[str, Any] = {"path": tmp_path / "spool.sqlite"}
    else:
        where = {"url": request.getfixturevalue("pg").new_database()}

    async def make(node: str = "n1", worker: int = 0, lease: float = 30.0) -> Spool:
        s = await open_spool(
            SpoolSettings(**where, node=node, worker=worker, lease=lease, pool_size=4),
            clock=clock,
        )
        opened.append(s)
        return s

    make.clock = clock  # type: ignore[attr-defined]
    yield make
    for s in opened:
        await s.close()


@pytest.fixture
async def spool(open_: Opener) -> Spool:
    return await open_()


def mail(n: int, *, msgid: str | None = None, sender: str = "a@example.org") -> bytes:
    mid = msgid or f"<m{n}@example.org>"
    return (
        f"From: {sender}\r\nTo: support@example.com\r\nSubject: mail {n}\r\n"
        f"Message-ID: {mid}\r\n\r\nbody {n}\r\n"
    ).encode()


async def done(spool: Spool, n: int, ref: str, **kw: Any) -> int:
    r = await spool.put(mail(n), ENV)
    assert r.id in await spool.claim_due(100)
    await spool.finish(
        r.id,
        Outcome(
            state=State.DONE,
            backend="whmcs",
            ticket_ref=ref,
            ticket_id=ref,
            system="whmcs",
            requester=kw.get("requester", "a@example.org"),
            message_id=f"<m{n}@example.org>",
            ack=kw.get("ack"),
        ),
    )
    return r.id


# -- intake -------------------------------------------------------------------------------------------


async def test_put_stores_bytes_and_envelope(spool: Spool) -> None:
    r = await spool.put(b"Subject: x\r\n\r\nbody", ENV)
    row = await spool.load(r.id)
    assert row is not None and row.state == "queued" and row.raw == b"Subject: x\r\n\r\nbody"
    assert row.envelope.rcpt_tos == ("support@example.com",) and row.envelope.peer == "127.0.0.1"
    assert await spool.read_body(r.id) == b"Subject: x\r\n\r\nbody"
    body = await spool.open_body(r.id)
    assert body is not None and body.size == 18 and body.read(0, 7) == b"Subject"
    body.close()


async def test_concurrent_puts_share_commits(spool: Spool) -> None:
    results = await asyncio.gather(*(spool.put(mail(i), ENV) for i in range(200)))
    assert len({r.id for r in results}) == 200
    assert spool.commits < 200  # type: ignore[attr-defined]  # group commit


async def test_a_source_key_stored_before_makes_a_duplicate(spool: Spool) -> None:
    a = await spool.put(mail(1), ENV, source_key="imap:box:INBOX:1:7")
    b = await spool.put(mail(1), ENV, source_key="imap:box:INBOX:1:7")
    assert b.duplicate and b.id == a.id and not a.duplicate
    assert await spool.has_source_key("imap:box:INBOX:1:7")
    assert not await spool.has_source_key("imap:box:INBOX:1:8")
    # an IMAP chunk asks for all its keys at once (more keys than one query's parameters)
    await spool.put(mail(3), ENV, source_key="imap:box:INBOX:1:900")
    chunk = [f"imap:box:INBOX:1:{uid}" for uid in range(1, 1201)] + ["imap:box:INBOX:1:7"]
    assert await spool.known_source_keys(chunk) == {"imap:box:INBOX:1:7", "imap:box:INBOX:1:900"}
    assert await spool.known_source_keys([]) == set()
    both = await asyncio.gather(*(spool.put(mail(2), ENV, source_key="k2") for _ in range(5)))
    assert len({r.id for r in both}) == 1 and sum(not r.duplicate for r in both) == 1


async def test_a_closed_spool_refuses_with_spool_error(open_: Opener) -> None:
    s = await open_()
    await s.close()
    with pytest.raises(SpoolError):
        await s.put(mail(1), ENV)


# -- claims, leases, recovery -------------------------------------------------------------------------


async def test_two_owners_never_claim_the_same_mail(open_: Opener) -> None:
    a, b = await open_(node="a"), await open_(node="b")
    ids = {(await a.put(mail(i), ENV)).id for i in range(60)}
    claims = await asyncio.gather(*(s.claim_due(7) for _ in range(6) for s in (a, b)))
    got = [i for c in claims for i in c]
    assert len(got) == len(set(got)) == 60 and set(got) == ids
    rows = await a.list_messages("processing")
    assert {r.claimed_by for r in rows} == {"a/0", "b/0"}


async def test_recover_takes_back_only_its_own_claims(open_: Opener) -> None:
    a, b = await open_(node="a"), await open_(node="b")
    m1, m2 = (await a.put(mail(1), ENV)).id, (await a.put(mail(2), ENV)).id
    assert await a.claim_due(1) == [m1]
    assert await b.claim_due(1) == [m2]
    await a.begin_step(m1, "newTicket")  # a dies while this call is in flight
    again = await open_(node="a")  # a restarts under its own name
    rec = await again.recover()
    assert (rec.requeued, rec.uncertain) == (1, 1)
    r1, r2 = await a.load(m1), await a.load(m2)
    assert r1 is not None and r1.state == "queued" and r1.uncertain and r1.crashes == 1
    assert r2 is not None and r2.state == "processing" and r2.claimed_by == "b/0"


async def test_a_dead_owners_claims_are_taken_over_after_the_lease(open_: Opener) -> None:
    a, b = await open_(node="a", lease=30), await open_(node="b", lease=30)
    clock = open_.clock  # type: ignore[attr-defined]
    ids = [(await a.put(mail(i), ENV)).id for i in range(3)]
    assert sorted(await a.claim_due(3)) == ids
    await a.begin_step(ids[0], "openTicket")
    clock.t += 20
    await b.heartbeat()
    assert (await b.take_over()).requeued == 0  # a's lease still runs
    clock.t += 11  # a sent no heartbeat: its lease ran out
    rec = await b.take_over()
    assert (rec.requeued, rec.uncertain) == (3, 1)
    assert sorted(await b.claim_due(5)) == ids
    assert {r.claimed_by for r in await b.list_messages("processing")} == {"b/0"}


async def test_heartbeat_keeps_claims_and_names_the_node(open_: Opener) -> None:
    a, b = await open_(node="a", lease=30), await open_(node="b", worker=1, lease=30)
    clock = open_.clock  # type: ignore[attr-defined]
    m = (await a.put(mail(1), ENV)).id
    assert await a.claim_due(1) == [m]
    for _ in range(4):
        clock.t += 20
        await a.heartbeat()
        assert (await b.take_over()).requeued == 0
    await b.heartbeat()
    alive = await b.nodes(within=30)
    assert [(n.owner, n.node, n.claims) for n in alive] == [("a/0", "a", 1), ("b/1", "b", 0)]
    clock.t += 31
    await b.heartbeat()
    assert [n.owner for n in await b.nodes(within=30)] == ["b/1"]


async def test_release_puts_back_without_counting_a_crash(spool: Spool) -> None:
    m = (await spool.put(mail(1), ENV)).id
    assert await spool.claim_due(1) == [m]
    rec = await spool.release([m])
    assert rec.requeued == 1
    row = await spool.load(m)
    assert row is not None and row.state == "queued" and row.crashes == 0 and row.claimed_by == ""


async def test_defer_then_due_later_and_release_deferred(open_: Opener) -> None:
    s = await open_()
    clock = open_.clock  # type: ignore[attr-defined]
    m = (await s.put(mail(1), ENV)).id
    assert await s.claim_due(5) == [m]
    await s.begin_step(m, "openTicket")
    await s.defer(m, error="busy", delay=60, backend="whmcs")
    row = await s.load(m)
    assert row is not None and row.state == "deferred" and row.uncertain  # a call was in flight
    assert await s.claim_due(5) == []
    assert await s.next_due_at() == clock.t + 60
    assert await s.release_deferred("whmcs") == 1
    assert await s.claim_due(5) == [m]


# -- outcomes and maps --------------------------------------------------------------------------------


async def test_finish_records_ticket_thread_and_ack_at_once(spool: Spool) -> None:
    ack = AckDraft("a@example.org", "", b"ack bytes", "<ack1@gw>")
    m = await done(spool, 1, "T1", ack=ack)
    row = await spool.load(m, with_raw=False)
    assert row is not None and row.state == "done" and row.ticket_ref == "T1" and row.raw is None
    assert await spool.ticket_by_ref("T1") == TicketInfo("whmcs", "whmcs", "T1", "a@example.org")
    assert await spool.thread_lookup(["<nope>", "<ack1@gw>"]) == ThreadHit("whmcs", "T1")
    assert await spool.thread_lookup(["<m1@example.org>"]) == ThreadHit("whmcs", "T1")
    assert await spool.thread_lookup([]) is None


async def test_ticket_by_ref_prefers_the_backend_asked_for(spool: Spool) -> None:
    for backend in ("a", "b"):
        r = await spool.put(mail(1), ENV)
        await spool.claim_due(5)
        await spool.finish(
            r.id, Outcome(state=State.DONE, backend=backend, ticket_ref="7", ticket_id=backend)
        )
    assert (await spool.ticket_by_ref("7", prefer_backend="a")).backend == "a"  # type: ignore[union-attr]
    assert (await spool.ticket_by_ref("7", prefer_backend="b")).backend == "b"  # type: ignore[union-attr]
    assert await spool.ticket_by_ref("8") is None


async def test_pending_original_and_duplicates(spool: Spool) -> None:
    first = (await spool.put(mail(1), ENV)).id
    second = (await spool.put(mail(1), ENV)).id  # the same mail again
    assert await spool.claim_due(5) == [first, second]
    assert await spool.set_identity(first, "<m1@example.org>", "d1", "mail 1") is None
    assert await spool.pending_original(["<x>", "<m1@example.org>"], second) == first
    assert await spool.set_identity(second, "<m1@example.org>", "d1", "mail 1") == first
    await spool.finish(first, Outcome(state=State.DONE, backend="x", ticket_ref="1"))
    assert await spool.state_of(first) == "done"
    assert await spool.pending_original(["<m1@example.org>"], second) is None


async def test_a_later_copy_in_hand_goes_first_and_the_earlier_one_waits(spool: Spool) -> None:
    """The copy whose identity is recorded first goes on; the other waits for it. After a crash
    that lost the 250, the sender's second copy may reach its identity before the first copy:
    both going on would make two tickets (seen in the kill -9 drill)."""
    first = (await spool.put(mail(1), ENV)).id
    second = (await spool.put(mail(1), ENV)).id  # the sender sent it again
    assert await spool.claim_due(5) == [first, second]
    assert await spool.set_identity(second, "<m1@example.org>", "d1", "mail 1") is None
    # the earlier copy comes second: the later copy is in hand, so this one waits for it
    assert await spool.set_identity(first, "<m1@example.org>", "d1", "mail 1") == second
    assert await spool.state_of(second) == "processing"
    await spool.defer(first, error="waiting", delay=0.0, count_attempt=False)
    await spool.finish(second, Outcome(state=State.DONE, backend="x", ticket_ref="1"))
    assert await spool.claim_due(5) == [first]
    assert await spool.set_identity(first, "<m1@example.org>", "d1", "mail 1") == second
    assert await spool.state_of(second) == "done"  # so the worker records it as a duplicate


async def test_an_earlier_copy_goes_before_a_later_copy_that_waits(spool: Spool) -> None:
    first = (await spool.put(mail(1), ENV)).id
    second = (await spool.put(mail(1), ENV)).id
    assert await spool.claim_due(5) == [first, second]
    assert await spool.set_identity(second, "<m1@example.org>", "d1", "mail 1") is None
    await spool.defer(second, error="interrupted", delay=60.0)  # e.g. a backend outage
    assert await spool.set_identity(first, "<m1@example.org>", "d1", "mail 1") is None


async def test_progress_steps_are_kept(spool: Spool) -> None:
    m = (await spool.put(mail(1), ENV)).id
    await spool.claim_due(1)
    await spool.begin_step(m, "newTicket")
    await spool.done_step(m, {"newTicket": {"id": "42"}})
    row = await spool.load(m)
    assert row is not None and row.progress == {"newTicket": {"id": "42"}}
    assert (await spool.release([m])).uncertain == 0  # the step was recorded done


async def test_a_step_begun_with_the_progress_so_far_records_both(spool: Spool) -> None:
    m = (await spool.put(mail(1), ENV)).id
    await spool.claim_due(1)
    await spool.begin_step(m, "newTicket")
    await spool.begin_step(m, "addMessage", progress={"newTicket": {"id": "42"}})
    row = await spool.load(m)
    assert row is not None and row.progress == {"newTicket": {"id": "42"}}
    rec = await spool.release([m])  # cut while addMessage was in flight
    assert rec.uncertain == 1


# -- outbox and limits --------------------------------------------------------------------------------


async def test_outbox_is_claimed_once_and_counted_for_limits(open_: Opener) -> None:
    a, b = await open_(node="a"), await open_(node="b")
    clock = open_.clock  # type: ignore[attr-defined]
    for i in range(4):
        await done(a, i, f"T{i}", ack=AckDraft(f"c{i % 2}@example.org", "", b"x", ""))
    assert await b.acks_since("c0@example.org", clock.t - 3600) == 2
    assert await b.acks_since(None, clock.t - 3600) == 4
    assert await b.acks_since("C1@example.org", clock.t - 3600) == 2
    first, second = await asyncio.gather(a.due_acks(), b.due_acks())
    assert sorted(x.id for x in first + second) == sorted({x.id for x in first + second})
    assert len(first) + len(second) == 4
    ack = (first + second)[0]
    owner = a if ack in first else b
    await owner.ack_result(ack.id, sent=False, error="4xx", retry_in=60)
    await owner.ack_result((first + second)[1].id, sent=True)
    clock.t += 61
    redo = await a.due_acks() + await b.due_acks()
    assert ack.id in {x.id for x in redo} and (first + second)[1].id not in {x.id for x in redo}
    counts = await a.counts()
    assert counts.outbox_pending == 3 and counts["done"] == 4


async def _claimed(spool: Spool, n: int) -> int:
    r = await spool.put(mail(n), ENV)
    assert r.id in await spool.claim_due(100)
    return r.id


async def _finish_acked(spool: Spool, msg_id: int, rcpt: str, limits: AckLimits) -> str:
    """Finish with an acknowledgement under `limits`: "" queued, else the limit that held it."""
    draft = AckDraft(rcpt, "", b"x", "", limits=limits)
    return await spool.finish(
        msg_id,
        Outcome(
            state=State.DONE,
            backend="whmcs",
            ticket_ref=f"L{msg_id}",
            ticket_id=f"L{msg_id}",
            system="whmcs",
            requester="someone@example.net",
            ack=draft,
        ),
    )


async def test_ack_limits_are_checked_where_the_ack_is_queued(open_: Opener) -> None:
    """Per sender, per domain, global with the strangers' share, counted over the last hour by
    every node's acknowledgements (issue 15's limits, in both engines)."""
    a, b = await open_(node="a"), await open_(node="b")
    clock = open_.clock  # type: ignore[attr-defined]
    limits = AckLimits(per_sender=2, per_domain=3, global_limit=6, stranger_share=0.5)

    async def ack(spool: Spool, n: int, rcpt: str) -> str:
        return await _finish_acked(spool, await _claimed(spool, n), rcpt, limits)

    assert await ack(a, 1, "x@example.org") == ""
    assert await ack(b, 2, "x@example.org") == ""
    assert await ack(a, 3, "x@example.org") == "sender"  # counted across both nodes
    assert await ack(b, 4, "y@example.org") == ""
    assert await ack(a, 5, "z@example.org") == "domain"
    assert await ack(b, 6, "w@example.net") == "global"  # strangers' share (3) used up
    await done(a, 7, "K7", requester="k@known.example")  # k has a ticket conversation
    clock.t += 1
    assert await ack(b, 8, "k@known.example") == ""  # the rest of the global limit
    assert await b.acks_since(None, clock.t - 3600) == 4
    clock.t += 3601
    assert await ack(a, 9, "x@example.org") == ""  # an hour later


async def test_ack_limit_holds_for_concurrent_finishes(open_: Opener) -> None:
    a, b = await open_(node="a"), await open_(node="b")
    one = AckLimits(per_sender=1, per_domain=0, global_limit=0)
    ids = [await _claimed(s, 100 + i) for i, s in enumerate((a, b, a, b))]
    results = await asyncio.gather(
        *(
            _finish_acked(s, i, "race@example.com", one)
            for s, i in zip((a, b, a, b), ids, strict=True)
        )
    )
    assert sorted(results) == ["", "sender", "sender", "sender"]


async def test_named_leases_have_one_holder(open_: Opener) -> None:
    a, b = await open_(node="a"), await open_(node="b")
    clock = open_.clock  # type: ignore[attr-defined]
    assert await a.try_lease("imap:box", 30)
    assert not await b.try_lease("imap:box", 30)
    assert await a.try_lease("imap:box", 30)  # renewed by its holder
    clock.t += 31
    assert await b.try_lease("imap:box", 30)  # a stopped renewing
    assert not await a.try_lease("imap:box", 30)
    await b.drop_lease("imap:box")
    assert await a.try_lease("imap:box", 30)


async def test_backend_slots_hold_across_owners(open_: Opener) -> None:
    a, b = await open_(node="a", lease=30), await open_(node="b", lease=30)
    clock = open_.clock  # type: ignore[attr-defined]
    got = await asyncio.gather(*(s.acquire_slot("whmcs", 3, i) for i, s in enumerate([a, b] * 4)))
    assert sum(got) == 3
    assert await a.acquire_slot("other", 3, 99)  # per backend
    held = [i for i, ok in enumerate(got) if ok]
    assert await [a, b][held[0] % 2].acquire_slot("whmcs", 3, held[0])  # its own slot again
    await [a, b][held[0] % 2].release_slot("whmcs", held[0])
    assert await b.acquire_slot("whmcs", 3, 100)
    b_held = 1 + sum(1 for i in held[1:] if i % 2 == 1)
    clock.t += 31  # owners that stopped renewing lose their slots
    await b.heartbeat()  # b renews its slots, a does not
    assert await a.acquire_slot("whmcs", b_held, 200) is False
    assert await a.acquire_slot("whmcs", b_held + 1, 201)
    assert await a.acquire_slot("whmcs", b_held + 1, 202) is False


async def test_a_slot_lent_on_stays_held_until_its_owner_gives_it_back(open_: Opener) -> None:
    """A slot is labelled with the mail it was taken for, but the owner lends it to later mails:
    the labelling mail's outcome or requeue does not free it, another owner cannot take a second
    row under its label, the owner's heartbeat (`slots=`) keeps it past the lease; `recover`
    frees what the owner's previous process held."""
    a, b = await open_(node="a", lease=30), await open_(node="b", lease=30)
    clock = open_.clock  # type: ignore[attr-defined]
    m1, m2 = (await a.put(mail(1), ENV)).id, (await a.put(mail(2), ENV)).id
    assert await a.claim_due(1) == [m1]
    assert await a.acquire_slot("whmcs", 1, m1)
    await a.finish(m1, Outcome(state=State.DONE, backend="whmcs", ticket_ref="T1", ticket_id="T1"))
    assert await b.acquire_slot("whmcs", 1, m2) is False  # still lent (to m2 by now)
    assert await b.acquire_slot("whmcs", 2, m1) is False  # a's label: not a second row
    assert await b.claim_due(1) == [m2]
    await b.release([m2])
    assert await b.acquire_slot("whmcs", 1, m2) is False
    clock.t += 20
    await a.heartbeat([], slots=[m1])  # no claims left, the slot is still held
    clock.t += 20
    assert await b.acquire_slot("whmcs", 1, m2) is False
    again = await open_(node="a")  # a restarts under its own name
    await again.recover()
    assert await b.acquire_slot("whmcs", 1, m2)


async def test_a_released_slot_is_signalled_to_other_processes(open_: Opener) -> None:
    """Engines with signals (PostgreSQL's NOTIFY) tell every process that a call slot of a
    backend came free, so that a waiter tries again at once; SQLite has none (waiters poll)."""
    a, b = await open_(node="a"), await open_(node="b")
    heard: asyncio.Queue[str] = asyncio.Queue()
    a.on_slot_freed(heard.put_nowait)
    if a.engine == "sqlite":
        assert await b.acquire_slot("whmcs", 1, 1)
        await b.release_slot("whmcs", 1)
        await asyncio.sleep(0.2)
        assert heard.empty()
        return
    got = None
    for n in range(50):  # until a's listening connection is up
        assert await b.acquire_slot("whmcs", 1, n)
        await b.release_slot("whmcs", n)
        try:
            got = await asyncio.wait_for(heard.get(), timeout=0.2)
            break
        except TimeoutError:
            continue
    assert got == "whmcs"
    await asyncio.sleep(0.3)  # late signals of the tries before a listened
    while not heard.empty():
        heard.get_nowait()
    await b.release_slot("whmcs", 999)  # held by no one: nothing was freed, nothing signalled
    await asyncio.sleep(0.3)
    assert heard.empty()


async def test_stored_mail_is_signalled_to_other_processes(open_: Opener) -> None:
    """A put, alone or in a group, wakes the workers of every process (PostgreSQL's NOTIFY at
    its commit); a duplicate stores nothing and need not. SQLite has no signal (the intake
    wakes its own worker)."""
    a, b = await open_(node="a"), await open_(node="b")
    heard: asyncio.Queue[None] = asyncio.Queue()
    a.on_work(lambda: heard.put_nowait(None))

    async def signalled() -> bool:
        try:
            await asyncio.wait_for(heard.get(), timeout=1.0)
        except TimeoutError:
            return False
        await asyncio.sleep(0.2)
        while not heard.empty():
            heard.get_nowait()
        return True

    if a.engine == "sqlite":
        await b.put(mail(1), ENV)
        assert not await signalled()
        return
    for _ in range(50):  # until a's listening connection is up (it signals once when it is)
        if await signalled():
            break
    assert await b.put(mail(1), ENV, source_key="k1")  # alone: one statement
    assert await signalled()
    assert (await b.put(mail(1), ENV, source_key="k1")).duplicate
    assert not await signalled()
    group = await asyncio.gather(*(b.put(mail(n), ENV) for n in range(2, 10)))
    assert len({r.id for r in group}) == 8
    assert await signalled()


async def test_backend_pauses_are_shared(open_: Opener) -> None:
    a, b = await open_(node="a"), await open_(node="b")
    clock = open_.clock  # type: ignore[attr-defined]
    await a.pause_backend("whmcs", clock.t + 60, "credentials refused")
    assert await b.backend_pauses() == {"whmcs": (clock.t + 60, "credentials refused")}
    await b.clear_pause("whmcs")
    assert await a.backend_pauses() == {}
    await a.pause_backend("whmcs", clock.t + 60, "again")
    clock.t += 61
    assert await b.backend_pauses() == {}


# -- inspection and repair ----------------------------------------------------------------------------


async def test_counts_list_retry_drop(spool: Spool) -> None:
    ids = [(await spool.put(mail(i), ENV)).id for i in range(3)]
    await spool.claim_due(1)
    await spool.finish(ids[0], Outcome(state=State.DEAD, reason="bad"))
    counts = await spool.counts()
    assert counts["dead"] == 1 and counts["queued"] == 2 and counts.waiting == 2
    assert counts.to_dict()["dead"] == 1
    assert [r.id for r in await spool.list_messages("queued")] == ids[1:]
    assert await spool.oldest_pending() is not None
    assert await spool.retry(None, all_dead=True) == 1
    assert await spool.drop(ids[2]) == 1
    assert await spool.load(ids[2]) is None
    assert [r.state for r in await spool.list_messages()] == ["queued", "queued"]
    stats = await spool.stats()
    assert stats["states"]["queued"]["count"] == 2 and "maps" in stats and "outbox" in stats


async def test_purge_by_age_keeps_waiting_mail(open_: Opener) -> None:
    s = await open_()
    clock = open_.clock  # type: ignore[attr-defined]
    old = await done(s, 1, "T1")
    waiting = (await s.put(mail(2), ENV)).id
    clock.t += 2 * DAY
    result = await s.purge(RetentionPolicy(done_raw_days=1, batch=1))
    assert result.raw_purged == 1 and result.raw_bytes == len(mail(1)) and result.batches >= 2
    assert await s.read_body(old) is None and await s.read_body(waiting) == mail(2)
    assert (await s.load(old, with_raw=False)).ticket_ref == "T1"  # type: ignore[union-attr]
    clock.t += 400 * DAY
    result = await s.purge(RetentionPolicy())
    assert result.messages_deleted == 1 and result.tickets_deleted == 1
    assert await s.load(old) is None and (await s.load(waiting)) is not None


async def test_erasure_finds_and_removes_one_address(spool: Spool) -> None:
    keep = await done(spool, 1, "T1")
    gone = (await spool.put(mail(2, sender="eve@example.net"), ENV)).id
    await spool.claim_due(5)
    await spool.finish(
        gone,
        Outcome(
            state=State.DONE,
            backend="whmcs",
            ticket_ref="T2",
            requester="eve@example.net",
            message_id="<m2@example.org>",
            ack=AckDraft("eve@example.net", "", b"ack", "<ack2@gw>"),
        ),
    )
    found = await spool.find_erasure("Eve@Example.net")
    assert found.message_ids == [gone] and found.tickets == 1 and found.outbox == 1
    assert await spool.load(gone) is not None  # the dry run changes nothing
    er = await spool.erase("eve@example.net", found)
    assert er.message_ids == [gone] and er.threads == 2
    assert await spool.load(gone) is None and await spool.load(keep) is not None
    assert (
        await spool.ticket_by_ref("T2") is None and await spool.thread_lookup(["<ack2@gw>"]) is None
    )
