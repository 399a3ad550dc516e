"""The SQLite spool: durable puts with group commit, recovery after a crash, outcomes and maps."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from gateway.errors import SpoolError
from gateway.models import Envelope
from gateway.spool.base import AckDraft, Outcome, State
from gateway.spool.sqlite import SCHEMA_VERSION, SqliteSpool

ROOT = Path(__file__).resolve().parent.parent
ENV = Envelope(mail_from="a@example.org", rcpt_tos=("support@example.com",), peer="127.0.0.1")


@pytest.fixture
def spool(tmp_path: Path):  # type: ignore[no-untyped-def]
    s = SqliteSpool(tmp_path / "spool.sqlite")
    yield s
    s.close_sync()


async def test_put_is_durable_and_visible_to_a_new_connection(spool: SqliteSpool) -> None:
    result = await spool.put(b"Subject: x\r\n\r\nbody", ENV)
    conn = sqlite3.connect(spool.path)
    row = conn.execute(
        "SELECT state, raw, rcpt_tos FROM messages JOIN bodies USING (id) WHERE id = ?",
        (result.id,),
    ).fetchone()
    assert row[0] == "queued"
    assert row[1] == b"Subject: x\r\n\r\nbody"
    assert "support@example.com" in row[2]


async def test_concurrent_puts_share_commits(spool: SqliteSpool) -> None:
    results = await asyncio.gather(
        *(spool.put(f"Subject: {i}\r\n\r\n".encode(), ENV) for i in range(300))
    )
    assert len({r.id for r in results}) == 300
    assert spool.puts == 300
    assert spool.commits < 300  # group commit: fewer fsyncs than messages


async def test_wal_and_full_sync(spool: SqliteSpool) -> None:
    conn = spool._reader()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert spool._wconn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL


async def test_source_key_makes_second_put_a_duplicate(spool: SqliteSpool) -> None:
    a = await spool.put(b"Subject: a\r\n\r\n", ENV, source_key="imap:box:INBOX:1:7")
    b = await spool.put(b"Subject: a\r\n\r\n", ENV, source_key="imap:box:INBOX:1:7")
    assert b.duplicate and b.id == a.id
    assert await spool.has_source_key("imap:box:INBOX:1:7")


async def test_recovery_requeues_processing_and_flags_inflight_uncertain(tmp_path: Path) -> None:
    s = SqliteSpool(tmp_path / "s.sqlite")
    a = await s.put(b"Subject: a\r\n\r\n", ENV)
    b = await s.put(b"Subject: b\r\n\r\n", ENV)
    assert sorted(await s.claim_due(10)) == [a.id, b.id]
    await s.begin_step(b.id, "newTicket")  # the crash comes while this call is in flight
    s.close_sync()
    s2 = SqliteSpool(tmp_path / "s.sqlite")
    requeued, uncertain = s2.recover_sync()
    assert (requeued, uncertain) == (2, 1)
    row_a, row_b = s2.get_sync(a.id), s2.get_sync(b.id)
    assert row_a is not None and row_b is not None
    assert row_a.state == row_b.state == "queued"
    assert not row_a.uncertain and row_b.uncertain
    s2.close_sync()


async def test_finish_records_ticket_thread_and_ack_in_one_step(spool: SqliteSpool) -> None:
    r = await spool.put(b"Subject: a\r\n\r\n", ENV)
    await spool.claim_due(1)
    await spool.finish(
        r.id,
        Outcome(
            state=State.DONE,
            backend="so",
            ticket_ref="1001",
            ticket_id="1001",
            system="superoffice-soap",
            requester="a@example.org",
            message_id="m1@example.org",
            ack=AckDraft("a@example.org", "", b"ack bytes", "ack1@gw"),
        ),
    )
    assert await spool.ticket_by_ref("1001") == ("so", "superoffice-soap", "1001", "a@example.org")
    assert await spool.thread_lookup(["nope", "ack1@gw"]) == ("so", "1001")
    assert await spool.thread_lookup(["m1@example.org"]) == ("so", "1001")
    acks = await spool.due_acks()
    assert [a.data for a in acks] == [b"ack bytes"]
    await spool.ack_result(acks[0].id, sent=True)
    assert await spool.due_acks() == []


async def test_defer_then_due_later(tmp_path: Path) -> None:
    now = [1000.0]
    s = SqliteSpool(tmp_path / "s.sqlite", clock=lambda: now[0])
    r = await s.put(b"Subject: a\r\n\r\n", ENV)
    assert await s.claim_due(5) == [r.id]
    await s.defer(r.id, error="busy", delay=60)
    assert await s.claim_due(5) == []
    now[0] += 61
    assert await s.claim_due(5) == [r.id]
    s.close_sync()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    s = SqliteSpool(tmp_path / "s.sqlite")
    s.close_sync()
    conn = sqlite3.connect(tmp_path / "s.sqlite")
    conn.execute(
        "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),)
    )
    conn.commit()
    conn.close()
    with pytest.raises(SpoolError, match="newer"):
        SqliteSpool(tmp_path / "s.sqlite")


async def test_put_after_close_fails_cleanly(tmp_path: Path) -> None:
    s = SqliteSpool(tmp_path / "s.sqlite")
    s.close_sync()
    with pytest.raises(SpoolError):
        await s.put(b"Subject: a\r\n\r\n", ENV)


async def test_a_mail_that_keeps_crashing_the_worker_is_set_aside(tmp_path: Path) -> None:
    from gateway.ack import load_templates
    from gateway.rules import load_rules
    from gateway.worker import Worker, WorkerSettings

    root = ROOT
    s = SqliteSpool(tmp_path / "s.sqlite")
    r = await s.put(b"Subject: poison\r\n\r\nbody", ENV)
    for _ in range(5):  # each time the worker died while the mail was `processing`
        assert await s.claim_due(1) == [r.id]
        s.recover_sync()
    row = s.get_sync(r.id)
    assert row is not None and row.crashes == 5 and row.state == "queued"
    rules = load_rules(
        root / "rules",
        {
            "superoffice-soap": "superoffice-soap",
            "superoffice-rest": "superoffice-rest",
            "interserver": "interserver",
            "whmcs": "whmcs",
        },
    )
    worker = Worker(
        s, {}, rules, load_templates(root / "templates"), WorkerSettings(max_crashes=5), tokens={}
    )
    assert await s.claim_due(1) == [r.id]
    await worker.process(r.id)
    row = s.get_sync(r.id, with_raw=True)
    assert row is not None and row.state == "dead"
    assert "crashes" in row.last_error and row.raw == b"Subject: poison\r\n\r\nbody"
    s.close_sync()


async def test_big_mails_go_in_and_come_out_whole_by_blob_io(spool: SqliteSpool) -> None:
    import os

    small = b"Subject: small\r\n\r\n" + b"s" * 1000
    big = b"Subject: big\r\n\r\n" + os.urandom(3 * (1 << 20) + 12345)  # above BLOB_STREAM_MIN
    exact = b"E" * (1 << 20)  # exactly at the limit: bound as before
    ids = [(await spool.put(bytearray(m), ENV)).id for m in (small, big, exact)]
    for msg_id, mail in zip(ids, (small, big, exact), strict=True):
        row = await spool.load(msg_id)
        assert row is not None and row.raw == mail and isinstance(row.raw, bytes)
        meta = await spool.load(msg_id, with_raw=False)
        assert meta is not None and meta.raw is None
    conn = sqlite3.connect(spool.path)
    assert conn.execute("SELECT raw FROM bodies WHERE id = ?", (ids[1],)).fetchone()[0] == big
    conn.execute("DELETE FROM bodies WHERE id = ?", (ids[1],))  # purged
    conn.commit()
    row = await spool.load(ids[1])
    assert row is not None and row.raw is None


async def test_a_big_body_stays_readable_while_another_is_open(spool: SqliteSpool) -> None:
    big = b"Subject: big\r\n\r\n" + b"z" * (2 << 20)
    first = (await spool.put(big, ENV)).id
    reader = spool.open_body(first)
    assert reader is not None and reader.read(0, 12) == b"Subject: big"
    second = (await spool.put(big + b"!", ENV)).id  # stored while the first one is open
    other = spool.open_body(second)
    assert other is not None and other.size == len(big) + 1  # not taken for purged
    assert other.read(other.size - 1, 1) == b"!"
    other.close()
    reader.close()
    assert spool.open_body(10_000) is None
