"""The spool's data lifecycle (issue 9): schema migration, retention, stats, backup, erasure, logs.

- Migration: tests/fixtures/spool_v1.sqlite was written by the schema-1 `SqliteSpool`
  (tests/fixtures/make_spool_v1.py); a copy is upgraded at open, after a backup copy, and every row
  is still there and usable. A failing migration leaves the spool at its old version. A fresh
  spool and a migrated one have the same schema.
- Retention runs on a clock the test controls (`SqliteSpool(clock=...)`), never on sleeps.
- Backup copies a spool that another thread writes to all the time; each copy opens, passes
  `PRAGMA integrity_check` and is a consistent prefix of what was written.
- Erasure leaves no byte of the address in the spool's files (searched case-insensitively).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway import cli
from gateway.errors import SpoolError
from gateway.logs import reopen_logs, setup_logging
from gateway.models import Envelope
from gateway.spool import migrations
from gateway.spool.base import AckDraft, Outcome, State
from gateway.spool.retention import (
    DAY,
    RetentionPolicy,
    RetentionTask,
    find_erasure,
    header_addresses,
    purge,
)
from gateway.spool.sqlite import SCHEMA_VERSION, SqliteSpool

FIXTURE = Path(__file__).parent / "fixtures" / "spool_v1.sqlite"
T0 = 1_750_000_000.0
TABLES = ("meta", "messages", "tickets", "threads", "outbox")


def _rows(path: Path, table: str, columns: list[str] | None = None) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(path)
    try:
        cols = ", ".join(columns) if columns else "*"
        return conn.execute(f"SELECT {cols} FROM {table} ORDER BY rowid").fetchall()
    finally:
        conn.close()


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]


def _schema(conn: sqlite3.Connection) -> dict[str, Any]:
    """Tables with their columns and indexes with their columns/partial flag: a comparable shape."""
    out: dict[str, Any] = {}
    for (name,) in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
    ).fetchall():
        out[f"table {name}"] = [tuple(r[1:]) for r in conn.execute(f"PRAGMA table_info({name})")]
        for idx in conn.execute(f"PRAGMA index_list({name})").fetchall():
            cols = [r[2] for r in conn.execute(f"PRAGMA index_info({idx[1]})")]
            out[f"index {idx[1]}"] = (name, bool(idx[2]), bool(idx[4]), cols)
    return out


def _env(sender: str = "a@example.org", rcpt: str = "support@example.com") -> Envelope:
    return Envelope(mail_from=sender, rcpt_tos=(rcpt,), peer="127.0.0.1")


def _mail(n: int, sender: str = "a@example.org", extra: str = "") -> bytes:
    return (
        f"From: {sender}\r\nTo: support@example.com\r\nSubject: mail {n}\r\n"
        f"Message-ID: <m{n}@example.org>\r\n{extra}\r\nbody {n}\r\n"
    ).encode()


# -- schema versions and migration --------------------------------------------------------------


def test_fixture_is_the_frozen_schema_1() -> None:
    fixture = sqlite3.connect(FIXTURE)
    blank = sqlite3.connect(":memory:")
    blank.executescript(migrations.SCHEMA_V1)
    assert migrations.read_version(fixture) == 1
    assert _schema(fixture) == _schema(blank)


def test_a_new_spool_has_the_schema_a_migrated_one_gets(tmp_path: Path) -> None:
    fresh = SqliteSpool(tmp_path / "fresh.sqlite")
    fresh.close_sync()
    old = sqlite3.connect(tmp_path / "old.sqlite", isolation_level=None)
    old.executescript(migrations.SCHEMA_V1)
    old.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    assert migrations.prepare(old, tmp_path / "old.sqlite") == 1
    assert migrations.read_version(old) == SCHEMA_VERSION == 5
    assert _schema(old) == _schema(sqlite3.connect(tmp_path / "fresh.sqlite"))


async def test_upgrading_the_v1_fixture_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    shutil.copy(FIXTURE, path)
    before = {t: _rows(FIXTURE, t) for t in TABLES}
    v1_message_columns = _columns(sqlite3.connect(FIXTURE), "messages")
    assert len(before["messages"]) == 9 and len(before["outbox"]) == 3

    spool = SqliteSpool(path)
    try:
        assert spool.opened_version == 1
        # the copy taken first is the old spool, unchanged
        bak = tmp_path / "spool.sqlite.v1.bak"
        assert bak.exists()
        assert {t: _rows(bak, t) for t in TABLES} == before
        assert sqlite3.connect(bak).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # the spool itself: new version, every row and value still there
        assert _rows(path, "meta") == [("schema_version", str(SCHEMA_VERSION))]
        kept = [c for c in v1_message_columns if c != "raw"]  # the bytes moved to `bodies` (v4)
        assert _rows(path, "messages", kept) == _rows(FIXTURE, "messages", kept)
        assert "raw" not in _columns(sqlite3.connect(path), "messages")
        assert _rows(path, "bodies", ["id", "raw"]) == _rows(FIXTURE, "messages", ["id", "raw"])
        for table in ("tickets", "threads"):
            assert _rows(path, table) == before[table]
        v1_outbox = _columns(sqlite3.connect(FIXTURE), "outbox")
        assert _rows(path, "outbox", v1_outbox) == before["outbox"]
        # v5: the rate-limit keys of acknowledgements already queued are filled in
        keys = _rows(path, "outbox", ["rcpt", "sender_key", "domain"])
        assert keys and all(k == r.lower() and d == r.rpartition("@")[2] for r, k, d in keys)
        assert {r[0] for r in _rows(path, "messages", ["purged_at"])} == {None}
        conn = sqlite3.connect(path)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"

        # ... and it works as a spool of the new version
        requeued, uncertain = spool.recover_sync()  # mail 8 was in a create call at the "crash"
        assert (requeued, uncertain) == (1, 1)
        assert spool.get_sync(8).uncertain  # type: ignore[union-attr]
        assert await spool.thread_lookup(["<ack-1001@gateway.example.com>"]) == (
            "superoffice-soap",
            "1001",
        )
        ref = await spool.ticket_by_ref("ABC-123456")
        assert ref == ("whmcs", "whmcs", "17", "bob@example.net")
        assert await spool.has_source_key("imap:billing-mailbox:INBOX:1700000000:42")
        acks = await spool.due_acks()
        assert [a.rcpt for a in acks] == ["bob@example.net"]
        row = spool.get_sync(1, with_raw=True)
        assert row is not None and row.raw is not None and b"Printer on fire" in row.raw
        claimed = await spool.claim_due(10)
        assert set(claimed) >= {8, 9}
        new = await spool.put(b"Subject: after the upgrade\r\n\r\nx", _env())
        assert new.id == 10
    finally:
        spool.close_sync()
    # opened again: nothing more to migrate, the backup is not taken again
    bak.unlink()
    again = SqliteSpool(path)
    assert again.opened_version == SCHEMA_VERSION
    again.close_sync()
    assert not bak.exists()


def test_a_failing_migration_leaves_the_old_spool(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "spool.sqlite"
    shutil.copy(FIXTURE, path)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE bodies (id INTEGER PRIMARY KEY, raw BLOB)")  # this part works
        conn.execute("CREATE INDEX oops ON no_such_table (x)")  # and this fails

    # the last step breaks after the earlier ones worked: all of them are rolled back together
    steps = (
        *migrations.MIGRATIONS[:-1],
        migrations.Migration(migrations.SCHEMA_VERSION, "broken on purpose", broken),
    )
    monkeypatch.setattr(migrations, "MIGRATIONS", steps)
    with pytest.raises(
        SpoolError,
        match=rf"from schema 1 to {migrations.SCHEMA_VERSION} failed.*nothing was changed",
    ):
        SqliteSpool(path)
    conn = sqlite3.connect(path)
    assert migrations.read_version(conn) == 1
    assert "purged_at" not in _columns(conn, "messages")  # every step was rolled back
    assert not conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'bodies'").fetchone()
    assert {t: _rows(path, t) for t in TABLES} == {t: _rows(FIXTURE, t) for t in TABLES}
    conn.close()
    monkeypatch.undo()
    spool = SqliteSpool(path)  # the real migration then succeeds
    assert spool.opened_version == 1
    spool.close_sync()


def test_a_newer_spool_is_refused_with_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "spool.sqlite"
    SqliteSpool(path).close_sync()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(SpoolError, match=r"version 99 is newer.*upgrade the gateway"):
        SqliteSpool(path)


# -- retention ------------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def days(self, n: float) -> None:
        self.t = T0 + n * DAY


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def spool(tmp_path: Path, clock: Clock) -> Iterator[SqliteSpool]:
    s = SqliteSpool(tmp_path / "spool.sqlite", clock=clock)
    yield s
    s.close_sync()


async def _finish(
    spool: SqliteSpool, n: int, state: State, *, ref: str = "", ack_to: str = "", **kw: Any
) -> int:
    sender = kw.pop("sender", "a@example.org")
    r = await spool.put(_mail(n, sender, kw.pop("extra", "")), _env(sender))
    await spool.write(  # claimed by the worker (this one, whatever else is queued)
        lambda c: c.execute("UPDATE messages SET state = 'processing' WHERE id = ?", (r.id,))
    )
    await spool.set_identity(r.id, f"<m{n}@example.org>", f"digest-{n}", f"mail {n}")
    await spool.finish(
        r.id,
        Outcome(
            state=state,
            backend="whmcs" if ref else "",
            rule="r",
            action=kw.pop("action", "new" if ref else ""),
            ticket_ref=ref,
            ticket_id=ref,
            system="whmcs" if ref else "",
            requester=sender,
            subject=f"mail {n}",
            message_id=f"<m{n}@example.org>",
            ack=AckDraft(ack_to, "", b"Subject: ack\r\n\r\nthanks\r\n", f"<ack{n}@gw>")
            if ack_to
            else None,
        ),
    )
    return r.id


def _state(spool: SqliteSpool, msg_id: int) -> tuple[str, bool, float | None] | None:
    def q(conn: sqlite3.Connection) -> tuple[str, bool, float | None] | None:
        r = conn.execute(
            "SELECT state, EXISTS (SELECT 1 FROM bodies WHERE bodies.id = messages.id),"
            " purged_at FROM messages WHERE id = ?",
            (msg_id,),
        ).fetchone()
        return None if r is None else (r[0], bool(r[1]), r[2])

    return spool.read_sync(q)


def _count(spool: SqliteSpool, sql: str) -> int:
    return int(spool.read_sync(lambda c: c.execute(sql).fetchone()[0]))


async def test_retention_by_state_and_age(spool: SqliteSpool, clock: Clock) -> None:
    policy = RetentionPolicy()  # the defaults: 30 / 7 / 7 / 90 / 365 / outbox 7
    done = await _finish(spool, 1, State.DONE, ref="T1", ack_to="a@example.org")
    active = await _finish(spool, 2, State.DONE, ref="T2")  # its conversation goes on
    suppressed = await _finish(spool, 3, State.SUPPRESSED)
    duplicate = await _finish(spool, 4, State.DUPLICATE)
    dead = await _finish(spool, 5, State.DEAD)
    pending_ack = await _finish(spool, 6, State.DONE, ref="T6", ack_to="b@example.org")
    await spool.ack_result(1, sent=True)  # the ack of mail 1 went out; mail 6's is pending
    deferred = (await spool.put(_mail(7), _env())).id
    assert await spool.claim_due(1) == [deferred]
    await spool.defer(deferred, error="busy", delay=10 * 365 * DAY)
    queued = (await spool.put(_mail(8), _env())).id

    assert (await purge(spool, policy)).changed() == 0  # nothing is old yet

    clock.days(8)
    r = await purge(spool, policy)
    assert (r.raw_purged, r.outbox_deleted) == (2, 1)  # suppressed + duplicate; the sent ack
    assert _state(spool, suppressed) == ("suppressed", False, clock.t)
    assert _state(spool, duplicate) == ("duplicate", False, clock.t)
    assert _state(spool, done) == ("done", True, None)
    assert _count(spool, "SELECT COUNT(*) FROM outbox WHERE state = 'pending'") == 1

    clock.days(31)
    r = await purge(spool, policy)
    assert r.raw_purged == 3 and r.raw_bytes == sum(
        len(_mail(n)) for n in (1, 2, 6)
    )  # the done ones
    row = spool.get_sync(done)
    assert row is not None and row.subject == "mail 1" and row.ticket_ref == "T1"  # metadata stays
    assert await spool.thread_lookup(["<m1@example.org>"]) == ("whmcs", "T1")  # maps stay
    assert _state(spool, dead) == ("dead", True, None)

    clock.days(91)
    r = await purge(spool, policy)
    assert r.dead_deleted == 1 and _state(spool, dead) is None

    clock.days(200)  # a follow-up keeps ticket T2's conversation alive
    await _finish(spool, 9, State.DONE, ref="T2", action="followup")

    clock.days(366)
    r = await purge(spool, policy)
    assert r.messages_deleted == 5  # 1, 2, 3, 4, 6: finished more than a year ago
    assert _state(spool, done) is None and _state(spool, active) is None
    assert await spool.ticket_by_ref("T1") is None
    assert await spool.thread_lookup(["<m1@example.org>"]) is None
    assert await spool.ticket_by_ref("T2") is not None  # last mail 166 days ago
    assert await spool.thread_lookup(["<m2@example.org>"]) == ("whmcs", "T2")
    assert r.tickets_deleted == 2 and r.threads_deleted == 4  # T1 and T6: mail + ack each
    assert _count(spool, "SELECT COUNT(*) FROM outbox") == 0  # mail 6's ack went with it

    clock.days(566)
    await purge(spool, policy)
    assert await spool.ticket_by_ref("T2") is None
    assert _count(spool, "SELECT COUNT(*) FROM tickets") == 0
    assert _count(spool, "SELECT COUNT(*) FROM threads") == 0
    # mail still waiting is never touched, however old
    assert _state(spool, deferred) == ("deferred", True, None)
    assert _state(spool, queued) == ("queued", True, None)
    assert _count(spool, "SELECT COUNT(*) FROM messages") == 2
    assert pending_ack


async def test_a_retried_dead_mail_starts_again(spool: SqliteSpool, clock: Clock) -> None:
    dead = await _finish(spool, 1, State.DEAD)
    clock.days(80)
    assert spool.retry_sync(dead) == 1  # handled: back in the queue
    clock.days(100)
    await purge(spool, RetentionPolicy())
    assert _state(spool, dead) == ("queued", True, None)


async def test_purge_runs_in_small_batches_and_intake_goes_on(
    spool: SqliteSpool, clock: Clock
) -> None:
    def bulk(conn: sqlite3.Connection) -> None:  # 2000 finished mails, quickly
        conn.executemany(
            "INSERT INTO messages (state, intake, mail_from, rcpt_tos, received_at, size,"
            " updated_at) VALUES ('done', 'smtp', 'a@example.org', '[]', ?, 1000, ?)",
            [(T0, T0) for _ in range(2000)],
        )
        conn.execute(
            "INSERT INTO bodies (id, raw) SELECT id, zeroblob(1000) FROM messages"
            " WHERE state = 'done'"
        )

    await spool.write(bulk)
    clock.days(31)
    order: list[str] = []

    async def purging() -> None:
        r = await purge(spool, RetentionPolicy(batch=100), pause=0.01)
        assert r.raw_purged == 2000 and r.batches >= 20
        order.append("purge done")

    async def intake() -> None:
        await asyncio.sleep(0)
        for i in range(5):
            await spool.put(_mail(100 + i), _env())
            order.append("put")

    await asyncio.gather(purging(), intake())
    assert order.index("put") < order.index("purge done")  # intake did not wait for the purge
    assert order.count("put") == 5


async def test_the_retention_task_runs_on_its_interval(spool: SqliteSpool, clock: Clock) -> None:
    msg = await _finish(spool, 1, State.DONE, ref="T1")
    task = RetentionTask(spool, RetentionPolicy(), interval=0.02, pause=0)
    runner = asyncio.create_task(task.run())
    for _ in range(500):
        if task.runs >= 1:
            break
        await asyncio.sleep(0.01)
    assert _state(spool, msg) == ("done", True, None)
    clock.days(31)
    for _ in range(500):
        if _state(spool, msg) == ("done", False, clock.t):
            break
        await asyncio.sleep(0.01)
    assert _state(spool, msg) == ("done", False, clock.t)
    task.stop()
    await asyncio.wait_for(runner, 5)


# -- stats, backup, erasure through the CLI ---------------------------------------------------------


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "config.toml"
    cfg.write_text(
        '[spool]\npath = "spool.sqlite"\n\n[smtp]\nrecipients = ["support@example.com"]\n'
    )
    return cfg


def _gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=120
    )


async def test_queue_stats_shows_counts_sizes_and_ages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path)
    now = time.time()
    spool = SqliteSpool(tmp_path / "spool.sqlite", clock=lambda: now - 3 * DAY)
    await _finish(spool, 1, State.DONE, ref="T1", ack_to="a@example.org")
    await _finish(spool, 2, State.DONE, ref="T2")
    await spool.put(_mail(3), _env())
    spool.clock = lambda: now
    await purge(spool, RetentionPolicy(done_raw_days=1))  # mails 1 and 2 lose their bytes
    await spool.put(_mail(4), _env())
    spool.close_sync()

    assert cli.main(["queue", "-c", str(cfg), "stats"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["queued"] == 2 and out["done"] == 2  # the flat counts scripts already read
    done, queued = out["states"]["done"], out["states"]["queued"]
    assert done["count"] == 2 and done["purged"] == 2 and done["raw_bytes"] == 0
    assert done["bytes"] == len(_mail(1)) + len(_mail(2))
    assert 3 * DAY - 60 < done["oldest_age_s"] < 3 * DAY + 60
    assert queued["raw_bytes"] == len(_mail(3)) + len(_mail(4))
    assert 3 * DAY - 60 < queued["oldest_age_s"] < 3 * DAY + 60
    assert out["raw_bytes"] == queued["raw_bytes"]
    assert out["maps"]["tickets"] == 2 and out["maps"]["threads"] == 3
    assert out["outbox"]["pending"]["count"] == 1
    assert out["schema_version"] == SCHEMA_VERSION
    assert out["files"]["spool_bytes"] > 0


def test_backup_while_another_task_writes(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    spool = SqliteSpool(tmp_path / "spool.sqlite")
    stop = threading.Event()
    written = [0]
    errors: list[BaseException] = []

    def writer() -> None:  # the "daemon": a mail and then its outcome, over and over
        async def loop() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                sender = f"w{n}@example.org"
                r = await spool.put(_mail(n, sender) + b"y" * 4000, _env(sender))
                assert await spool.claim_due(1) == [r.id]
                await spool.finish(
                    r.id,
                    Outcome(
                        state=State.DONE,
                        backend="whmcs",
                        ticket_ref=f"T{r.id}",
                        ticket_id=str(r.id),
                        system="whmcs",
                        requester=sender,
                        message_id=f"<m{n}@example.org>",
                    ),
                )
                written[0] = n

        try:
            asyncio.run(loop())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        while written[0] < 50:
            time.sleep(0.01)
        copies = []
        for i in range(3):
            dest = tmp_path / f"copy{i}.sqlite"
            before = written[0]
            res = _gateway("spool", "backup", "-c", str(cfg), str(dest))
            assert res.returncode == 0, res.stderr
            assert "checked" in res.stdout
            copies.append((dest, before, written[0]))
    finally:
        stop.set()
        t.join(30)
        spool.close_sync()
    assert not errors
    for dest, before, after in copies:
        assert after > before  # the writer went on during the backup
        assert not Path(f"{dest}-wal").exists()  # one self-contained file
        conn = sqlite3.connect(dest)
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert migrations.read_version(conn) == SCHEMA_VERSION
        ids = [r[0] for r in conn.execute("SELECT id FROM messages ORDER BY id")]
        assert len(ids) >= before and ids == list(range(1, len(ids) + 1))  # a prefix, no gaps
        states = dict(conn.execute("SELECT id, state FROM messages").fetchall())
        # only the newest mail may be between its put and its outcome
        assert all(states[i] == "done" for i in ids[:-1])
        tickets = {r[0] for r in conn.execute("SELECT ticket_id FROM tickets")}
        assert tickets == {str(i) for i in ids if states[i] == "done"}  # outcome + map together
        assert conn.execute("SELECT COUNT(*) FROM threads").fetchone()[0] == len(tickets)
        conn.close()


def test_backup_into_a_directory_and_of_a_missing_spool(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    res = _gateway("spool", "backup", "-c", str(cfg), str(tmp_path))
    assert res.returncode == 1 and "no spool" in res.stderr
    SqliteSpool(tmp_path / "spool.sqlite").close_sync()
    (tmp_path / "backups").mkdir()
    res = _gateway("spool", "backup", "-c", str(cfg), str(tmp_path / "backups"))
    assert res.returncode == 0, res.stderr
    [copy] = list((tmp_path / "backups").iterdir())
    assert copy.name.startswith("spool-") and copy.suffix == ".sqlite"
    assert copy.stat().st_mode & 0o007 == 0  # no access for others: it holds customer mail


VICTIM = "Victim.Person@Example.ORG"


def _traces(path: Path, *needles: bytes) -> list[bytes]:
    """Which needles occur (case-insensitively) in the spool's file, WAL or shared memory.

    Read in another process: opening and closing the files here would drop the POSIX locks
    of this process's open SQLite connections (a known SQLite pitfall), as a daemon never would.
    """
    code = (
        "import sys; from pathlib import Path\n"
        "data = b''.join(Path(sys.argv[1] + s).read_bytes()"
        " for s in ('', '-wal', '-shm') if Path(sys.argv[1] + s).exists()).lower()\n"
        "print(' '.join(n for n in sys.argv[2:] if bytes.fromhex(n) in data))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code, str(path), *(n.lower().hex() for n in needles)],
        capture_output=True,
        text=True,
        check=True,
    )
    return [bytes.fromhex(h) for h in res.stdout.split()]


async def test_erase_leaves_no_trace_of_the_address(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    path = tmp_path / "spool.sqlite"
    clock = Clock()
    spool = SqliteSpool(path, clock=clock)
    low = VICTIM.lower()
    # the victim's own mails: a ticket with an ack and a follow-up, one still queued
    await _finish(spool, 1, State.DONE, ref="V1", ack_to=low, sender=low)
    await _finish(spool, 2, State.DONE, ref="V1", action="followup", sender=VICTIM.upper())
    await spool.put(_mail(3, VICTIM), _env(VICTIM))
    # a mail whose raw bytes retention already purged: found by its envelope
    await _finish(spool, 6, State.DONE, ref="V6", sender=low)
    clock.days(31)
    await purge(spool, RetentionPolicy())
    clock.days(32)
    # named only in the headers of someone else's mail
    await _finish(spool, 4, State.DONE, ref="K4", extra=f"Cc: Victim <{VICTIM}>\r\n")
    await _finish(spool, 5, State.SUPPRESSED, sender="c@example.org", extra=f"Reply-To: {low}\r\n")
    # other people's mail stays
    keep = [await _finish(spool, 10 + i, State.DONE, ref=f"K{10 + i}") for i in range(3)]
    near_miss = "victim.persons@example.org"  # kept
    keep.append((await spool.put(_mail(20, near_miss), _env(near_miss))).id)
    assert _traces(path, low.encode()) == [low.encode()]  # the search below can see it

    dry = _gateway("erase", "-c", str(cfg), "--address", VICTIM, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "dry run" in dry.stdout
    assert _count(spool, "SELECT COUNT(*) FROM messages") == 10  # nothing changed

    res = _gateway("erase", "-c", str(cfg), "--address", VICTIM)
    assert res.returncode == 0, res.stderr
    counts = {
        line.split()[0]: int(line.split()[1])
        for line in res.stdout.splitlines()
        if line.strip().split(" ")[0] in ("messages", "tickets", "threads", "outbox")
    }
    # threads: mails 1, 2 and the ack of V1, mail 6 of V6, and mail 4 (the K4 ticket stays)
    assert counts == {"messages": 6, "tickets": 2, "threads": 5, "outbox": 1}, res.stdout
    assert (
        dry.stdout.replace("would remove (dry run, nothing changed)", "removed").split("\n")[:5]
        == res.stdout.split("\n")[:5]
    )
    assert "compacted" in res.stdout and "outside the gateway" in res.stdout

    # the spool was open all along (like a running daemon): its files hold no trace any more
    assert _traces(path, low.encode(), low.encode("utf-16-le")) == []
    assert _traces(path, b"<ack1@gw>") == []  # the ack's Message-ID went with the victim's ticket
    remaining = [r.id for r in spool.list_sync()]
    assert remaining == keep
    assert await spool.ticket_by_ref("K10") is not None
    assert spool.read_sync(lambda c: c.execute("PRAGMA integrity_check").fetchone()[0]) == "ok"
    spool.close_sync()


async def test_erase_does_not_touch_a_mail_being_processed(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    spool = SqliteSpool(tmp_path / "spool.sqlite")
    r = await spool.put(_mail(1, VICTIM), _env(VICTIM))
    await spool.put(_mail(2, VICTIM), _env(VICTIM))
    assert await spool.claim_due(1) == [r.id]  # the worker has it right now
    found = spool.read_sync(lambda c: find_erasure(c, VICTIM))
    assert (found.messages, found.busy) == (1, [r.id])
    spool.close_sync()
    res = _gateway("erase", "-c", str(cfg), "--address", VICTIM)
    assert res.returncode == 1
    assert "being processed" in res.stderr
    conn = sqlite3.connect(tmp_path / "spool.sqlite")
    assert conn.execute("SELECT id, state FROM messages").fetchall() == [(r.id, "processing")]


def test_header_addresses() -> None:
    raw = (
        b"From: =?utf-8?q?V=C3=ADctim?= <Victim@Example.org>\r\n"
        b'To: a@example.com, "B, C" <b@example.com>\r\nCc: c@example.com\r\n'
        b"Reply-To: r@example.com\r\nX-Other: x@example.com\r\n\r\nTo: body@example.com\r\n"
    )
    assert header_addresses(raw) == {
        "victim@example.org",
        "a@example.com",
        "b@example.com",
        "c@example.com",
        "r@example.com",
    }


# -- log files ----------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_log_file_follows_logrotate(tmp_path: Path, restore_logging: None) -> None:
    log_file = tmp_path / "gateway.log"
    setup_logging("info", "kv", log_file)
    log = logging.getLogger("gateway.test")
    log.info("event=one")
    (tmp_path / "gateway.log").rename(tmp_path / "gateway.log.1")  # logrotate, no copytruncate
    log.info("event=two")  # the handler sees the rename and opens a new file
    (tmp_path / "gateway.log").rename(tmp_path / "gateway.log.2")
    reopen_logs()  # what SIGHUP does
    log.info("event=three")
    assert "event=one" in (tmp_path / "gateway.log.1").read_text()
    assert "event=two" in (tmp_path / "gateway.log.2").read_text()
    text = log_file.read_text()
    assert "event=three" in text and "event=two" not in text
    assert text.split(" ")[1] == "level=info"  # timestamps, never journald's <N> prefix


def test_v4_moves_the_raw_bytes_to_bodies_and_marks_rows_without_them_purged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "v3.sqlite"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(migrations.SCHEMA_V1)
    for step in migrations.MIGRATIONS:
        if step.version <= 3:
            step.apply(conn)
    conn.execute("INSERT INTO meta VALUES ('schema_version', '3')")
    insert = (
        "INSERT INTO messages (id, state, intake, mail_from, rcpt_tos, received_at, size, raw,"
        " updated_at, purged_at) VALUES (?, 'done', 'smtp', 'a@x', '[]', 1, 3, ?, 5, ?)"
    )
    conn.execute(insert, (1, b"abc", None))  # still has its bytes
    conn.execute(insert, (2, None, 7.0))  # purged by retention
    conn.execute(insert, (3, None, None))  # bytes gone without a purge mark
    assert migrations.prepare(conn, path) == 3
    assert conn.execute("SELECT id, raw FROM bodies").fetchall() == [(1, b"abc")]
    purged = conn.execute("SELECT id, purged_at FROM messages ORDER BY id").fetchall()
    assert purged == [(1, None), (2, 7.0), (3, 5.0)]
    conn.close()
    spool = SqliteSpool(path)
    try:
        assert spool.get_sync(1, with_raw=True).raw == b"abc"  # type: ignore[union-attr]
        assert spool.get_sync(2, with_raw=True).raw is None  # type: ignore[union-attr]
    finally:
        spool.close_sync()
