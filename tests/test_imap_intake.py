"""IMAP intake against a real Dovecot on 127.0.0.1 and a real SqliteSpool (see tests/imap_server.py).

The Dovecot fixture installs the Debian package when it is missing (as root) and fails, never
skips, when it cannot: a CI run without Dovecot must not pass. Waits are generous deadlines on
observable state (spool rows, folder contents, status), never fixed sleeps asserting speed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from gateway.errors import SpoolError
from gateway.intake.imap import (
    ImapConfig,
    ImapIntake,
    _imap_utf7,
    envelope_fields,
    parse_fetch,
    uid_set,
)
from gateway.logs import event_text
from gateway.models import Envelope
from gateway.spool.base import PutResult
from gateway.spool.sqlite import SqliteSpool
from gateway.status import Component
from tests.spool_sql import sqlite_read

sys.path.insert(0, str(Path(__file__).parent))
from imap_server import (
    DovecotServer,
    DovecotUnavailable,
    Mailbox,
    TokenIntrospection,
    make_message,
)

LOGGER = "gateway.intake.imap"
NO_IDLE_NO_MOVE = "imap_capability = IMAP4rev1 SASL-IR LITERAL+ UIDPLUS"


# -- fixtures -----------------------------------------------------------------------------------


def _start_dovecot(extra_conf: str = "", oauth2_url: str | None = None) -> DovecotServer:
    try:
        return DovecotServer.create(extra_conf=extra_conf, oauth2_url=oauth2_url)
    except DovecotUnavailable as exc:
        ci = os.environ.get("CI", "").lower() in ("1", "true", "yes")
        pytest.fail(f"Dovecot is required for the IMAP tests{' (CI)' if ci else ''}: {exc}")


@pytest.fixture(scope="module")
def dovecot() -> Iterator[DovecotServer]:
    server = _start_dovecot()
    yield server
    server.cleanup()


_accounts = iter(range(1, 10_000))


@pytest.fixture
def mailbox(dovecot: DovecotServer) -> Mailbox:
    """A fresh account per test on the shared server."""
    if not dovecot.running:  # a test that restarted it and failed half-way
        dovecot.start()
    return dovecot.add_mailbox(f"support{next(_accounts)}@example.com")


@pytest.fixture
def own_dovecot() -> Iterator[DovecotServer]:
    """A private server for tests that stop/restart it."""
    server = _start_dovecot()
    yield server
    server.cleanup()


@pytest.fixture
async def spool(tmp_path: Path) -> AsyncIterator[SqliteSpool]:
    s = SqliteSpool(tmp_path / "spool.sqlite")
    yield s
    await s.close()


@pytest.fixture
def imap_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


def make_cfg(mb: Mailbox, **kw: Any) -> ImapConfig:
    base: dict[str, Any] = {
        "name": "support",
        "host": "127.0.0.1",
        "port": mb.server.port,
        "security": "plain",
        "username": mb.username,
        "password": mb.password,
        "poll_interval": 60,
    }
    base.update(kw)
    return ImapConfig(**base)


def make_intake(cfg: ImapConfig, spool: Any, tmp_path: Path, **kw: Any) -> ImapIntake:
    opts: dict[str, Any] = {"retry_base": 0.2, "retry_cap": 2.0, "login_retry": 0.5}
    opts.update(kw)
    return ImapIntake(
        cfg, spool, Component("imap:" + cfg.name, "intake"), base_dir=tmp_path, **opts
    )


@contextlib.asynccontextmanager
async def running(intake: ImapIntake) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(intake.run())
    try:
        yield task
    finally:
        await intake.stop()
        await asyncio.wait_for(task, 30)


async def wait_until(
    what: str,
    check: Callable[[], bool],
    timeout: float = 60.0,
    task: asyncio.Task[Any] | None = None,
) -> float:
    """Poll `check` (run in a thread: it may use blocking imaplib) until true; returns seconds."""
    start = time.monotonic()
    while True:
        if await asyncio.to_thread(check):
            return time.monotonic() - start
        if task is not None and task.done():
            task.result()
            raise AssertionError(f"intake ended while waiting for {what}")
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)


def rows(spool: SqliteSpool) -> list[tuple[str, bytes, str, str, str]]:
    """(source_key, raw, intake, mail_from, rcpt_tos) of every spooled message."""
    return [
        (r[0], bytes(r[1]), r[2], r[3], r[4])
        for r in sqlite_read(
            spool,
            lambda c: c.execute(
                "SELECT source_key, raw, intake, mail_from, rcpt_tos FROM messages"
                " JOIN bodies USING (id) ORDER BY id"
            ).fetchall(),
        )
    ]


def row_count(spool: SqliteSpool) -> int:
    return int(
        sqlite_read(spool, lambda c: c.execute("SELECT count(*) FROM messages").fetchone()[0])
    )


def message_ids(raws: list[bytes]) -> list[str]:
    out = []
    for raw in raws:
        m = re.search(rb"^Message-ID: <([^>]+)>", raw, re.MULTILINE)
        assert m is not None
        out.append(m[1].decode())
    return out


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[str]:
    return [event_text(r) for r in caplog.records if f"event={event} " in event_text(r) + " "]


# -- config -------------------------------------------------------------------------------------


def test_config_defaults_and_design_keys() -> None:
    cfg = ImapConfig(
        name="support-mailbox",
        host="imap.example.com",
        port=993,
        security="tls",
        username="support@example.com",
        password_file="/run/credentials/ticket-gateway/imap",
        folders=["INBOX"],
        after="move",
        move_to="Processed",
        ca_file="/etc/ssl/certs/ca.pem",
    )
    assert cfg.verify is True
    assert cfg.poll_interval == 60
    assert cfg.idle_timeout == 25 * 60
    assert cfg.batch == 50
    assert cfg.auth == "password"
    assert ImapConfig(name="x", host="h", username="u", password="p").port == 993
    assert (
        ImapConfig(name="x", host="h", username="u", password="p", security="starttls").port == 143
    )


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"security": "plain", "host": "imap.example.com"}, "plain"),
        ({"unknown_key": 1}, "Extra inputs"),
        ({"password": None}, "one of password"),
        ({"password_env": "X"}, "only one of"),
        ({"auth": "xoauth2"}, "exactly one of oauth2_token_file"),
        ({"oauth2_token_file": "t"}, "xoauth2"),
        ({"folders": ["INBOX", "Processed"]}, "also a watched folder"),
        ({"folders": []}, "at least 1"),
        ({"name": "a:b"}, "':'"),
        ({"idle_timeout": 30 * 60}, "less than or equal"),
    ],
)
def test_config_refuses(kw: dict[str, Any], message: str) -> None:
    base: dict[str, Any] = {"name": "m", "host": "127.0.0.1", "username": "u", "password": "p"}
    base.update(kw)
    with pytest.raises(ValidationError, match=re.escape(message)):
        ImapConfig(**base)


def test_plain_allowed_to_loopback_only() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        ImapConfig(name="m", host=host, security="plain", username="u", password="p")


def test_helpers() -> None:
    assert uid_set([3, 1, 2, 7, 9, 10]) == "1:3,7,9:10"
    assert uid_set([5]) == "5"
    assert _imap_utf7("Entwürfe") == "Entw&APw-rfe"
    assert _imap_utf7("A&B") == "A&-B"
    # aioimaplib shape: header lines are bytes, literals bytearray; an unbalanced ")" in a body
    # makes the next header keep its "* " prefix.
    lines = [
        b"1 FETCH (UID 11 BODY[] {5}",
        bytearray(b"a :)\n"),
        b")",
        b"* 2 FETCH (BODY[] {3}",
        bytearray(b"xyz"),
        b" UID 12)",
        b"3 FETCH (FLAGS (\\Seen) UID 13)",
        b"Fetch completed.",
    ]
    entries = parse_fetch(lines)
    assert [(re.search(rb"UID (\d+)", t)[1], lit) for t, lit in entries] == [  # type: ignore[index]
        (b"11", b"a :)\n"),
        (b"12", b"xyz"),
        (b"13", None),
    ]
    raw = (
        b"Return-Path: <Bounce@Example.org>\r\nDelivered-To: box@example.com\r\n"
        b"X-Original-To: support@example.com\r\nSubject: x\r\n\r\nbody"
    )
    assert envelope_fields(raw, "box@example.com") == (
        "bounce@example.org",
        ("support@example.com",),
    )
    assert envelope_fields(b"Delivered-To: a@x\r\nDelivered-To: b@x\r\n\r\n", "u") == ("", ("a@x",))
    assert envelope_fields(b"Subject: x\r\n\r\n", "Support@Example.com") == (
        "",
        ("support@example.com",),
    )
    assert envelope_fields(b"Return-Path: <>\r\n\r\n", "u")[0] == ""


# -- against Dovecot ----------------------------------------------------------------------------


async def test_backlog_of_500_stored_exactly_once(
    mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path, imap_log: pytest.LogCaptureFixture
) -> None:
    n = 500
    headers = {"Return-Path": "<customer@example.org>"}
    await asyncio.to_thread(
        mailbox.append, [make_message(i, headers=headers) for i in range(1, n + 1)]
    )
    assert "Processed" not in mailbox.folders()
    intake = make_intake(make_cfg(mailbox), spool, tmp_path)
    start = time.monotonic()
    async with running(intake) as task:
        await wait_until(
            "500 spooled and moved",
            lambda: row_count(spool) == n and mailbox.count("INBOX") == 0,
            timeout=120,
            task=task,
        )
        elapsed = time.monotonic() - start
        assert intake.status.ok, intake.status.detail
    got = rows(spool)
    assert len(got) == n
    ids = message_ids([r[1] for r in got])
    assert sorted(ids) == sorted(f"msg-{i}@test.example" for i in range(1, n + 1))
    keys = [r[0] for r in got]
    assert len(set(keys)) == n
    uidvalidity = mailbox.uidvalidity("Processed") and mailbox.uidvalidity("INBOX")
    assert all(re.fullmatch(rf"imap:support:INBOX:{uidvalidity}:\d+", k) for k in keys)
    assert {(r[2], r[3], r[4]) for r in got} == {
        ("support", "customer@example.org", f'["{mailbox.username}"]')
    }
    assert intake.stored == n
    processed = mailbox.messages("Processed")
    assert len(processed) == n
    # BODY.PEEK[]: fetching never set \Seen, and the bytes in the spool are the bytes on the server
    assert not any("\\Seen" in flags for flags, _ in processed.values())
    assert sorted(r[1] for r in got) == sorted(raw for _, raw in processed.values())
    assert events(imap_log, "imap_folder_created")
    print(f"\n500-message backlog: {elapsed:.2f}s ({n / elapsed:.0f} mails/s)")


async def test_new_message_picked_up_by_idle(
    mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path, imap_log: pytest.LogCaptureFixture
) -> None:
    # poll_interval far beyond the deadline: only IDLE can deliver the mail in time.
    intake = make_intake(make_cfg(mailbox, poll_interval=600), spool, tmp_path)
    async with running(intake) as task:
        await wait_until("connected", lambda: bool(events(imap_log, "imap_connected")), task=task)
        assert "idle=True" in events(imap_log, "imap_connected")[0]
        await asyncio.sleep(0.5)  # let IDLE begin
        await asyncio.to_thread(mailbox.append, [make_message(1)])
        latency = await wait_until(
            "IDLE delivery", lambda: row_count(spool) == 1, timeout=20, task=task
        )
        await wait_until("moved", lambda: mailbox.count("INBOX") == 0, timeout=20, task=task)
    print(f"\nIDLE: appended -> spooled in {latency:.2f}s")


async def test_idle_is_reissued_after_idle_timeout(
    mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path
) -> None:
    intake = make_intake(make_cfg(mailbox, idle_timeout=0.5, poll_interval=600), spool, tmp_path)
    async with running(intake) as task:
        await wait_until("IDLE re-issued", lambda: intake.idles >= 4, timeout=30, task=task)
        assert intake.connects == 1  # DONE and IDLE again on the same connection
        await asyncio.to_thread(mailbox.append, [make_message(1)])
        await wait_until("still delivering", lambda: row_count(spool) == 1, timeout=20, task=task)


async def test_polling_and_copy_fallback_without_idle_and_move(
    spool: SqliteSpool, tmp_path: Path, imap_log: pytest.LogCaptureFixture
) -> None:
    server = _start_dovecot(extra_conf=NO_IDLE_NO_MOVE)
    try:
        mb = server.add_mailbox("poll@example.com")
        await asyncio.to_thread(mb.append, [make_message(i) for i in range(1, 4)])
        intake = make_intake(make_cfg(mb, poll_interval=0.5, batch=2), spool, tmp_path)
        async with running(intake) as task:
            await wait_until("backlog", lambda: row_count(spool) == 3, task=task)
            assert "idle=False" in events(imap_log, "imap_connected")[0]
            await asyncio.to_thread(mb.append, [make_message(4)])
            await wait_until(
                "polled", lambda: row_count(spool) == 4 and mb.count("INBOX") == 0, task=task
            )
        # COPY + STORE \Deleted + UID EXPUNGE: each message exactly once in Processed.
        assert sorted(message_ids([raw for _, raw in mb.messages("Processed").values()])) == sorted(
            f"msg-{i}@test.example" for i in range(1, 5)
        )
    finally:
        server.cleanup()


async def test_dovecot_restarted_in_the_middle(
    own_dovecot: DovecotServer,
    spool: SqliteSpool,
    tmp_path: Path,
    imap_log: pytest.LogCaptureFixture,
) -> None:
    n = 300
    mb = own_dovecot.add_mailbox("restart@example.com")
    await asyncio.to_thread(mb.append, [make_message(i) for i in range(1, n + 1)])
    # A spool that takes 50 ms per put keeps the intake busy for seconds: the restart
    # lands in the middle of the backlog, not after it.
    slow = SlowSpool(spool, delay=0.05)
    intake = make_intake(make_cfg(mb, batch=10), slow, tmp_path)
    async with running(intake) as task:
        await wait_until("some progress", lambda: row_count(spool) >= 30, task=task)
        t0 = time.monotonic()
        await asyncio.to_thread(own_dovecot.restart)
        print(f"\nrestart took {time.monotonic() - t0:.2f}s at {row_count(spool)} rows")
        assert row_count(spool) < n, "the backlog was done before the restart"
        await wait_until(
            "all stored after the restart",
            lambda: row_count(spool) == n and mb.count("INBOX") == 0,
            timeout=120,
            task=task,
        )
        await wait_until("status ok", lambda: intake.status.ok, task=task)
    got = rows(spool)
    assert len({r[0] for r in got}) == n
    assert sorted(message_ids([r[1] for r in got])) == sorted(
        f"msg-{i}@test.example" for i in range(1, n + 1)
    )
    assert mb.count("Processed") == n
    assert intake.connects >= 2
    assert events(imap_log, "imap_connection_failed")


async def test_message_appended_while_others_are_processed(
    mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path
) -> None:
    n = 200
    await asyncio.to_thread(mailbox.append, [make_message(i) for i in range(1, n + 1)])
    intake = make_intake(make_cfg(mailbox, batch=5, poll_interval=600), spool, tmp_path)
    async with running(intake) as task:
        await wait_until("processing", lambda: row_count(spool) >= 10, task=task)
        assert row_count(spool) < n, "backlog finished before the append: make it larger"
        await asyncio.to_thread(mailbox.append, [make_message(i) for i in range(n + 1, n + 4)])
        await wait_until(
            "all stored",
            lambda: row_count(spool) == n + 3 and mailbox.count("INBOX") == 0,
            timeout=60,
            task=task,
        )
    got = rows(spool)
    assert len(got) == n + 3
    assert len(set(message_ids([r[1] for r in got]))) == n + 3


async def test_crash_between_commit_and_move_makes_no_second_row(
    mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path
) -> None:
    raws = [make_message(i) for i in (1, 2)]
    await asyncio.to_thread(mailbox.append, raws)
    uv = mailbox.uidvalidity()
    # As if a previous run stored UID 1 and died before its MOVE.
    await spool.put(
        raws[0], Envelope("", ("x",), intake="support"), source_key=f"imap:support:INBOX:{uv}:1"
    )
    intake = make_intake(make_cfg(mailbox), spool, tmp_path)
    async with running(intake) as task:
        await wait_until(
            "moved", lambda: mailbox.count("INBOX") == 0 and row_count(spool) == 2, task=task
        )
    assert intake.stored == 1  # only UID 2 was new
    assert [r[0] for r in rows(spool)] == [
        f"imap:support:INBOX:{uv}:1",
        f"imap:support:INBOX:{uv}:2",
    ]
    assert mailbox.count("Processed") == 2


async def test_uidvalidity_reset_gives_new_keys_and_loses_nothing(
    mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path, imap_log: pytest.LogCaptureFixture
) -> None:
    await asyncio.to_thread(mailbox.append, [make_message(1), make_message(2)])
    old = mailbox.uidvalidity()
    intake = make_intake(make_cfg(mailbox, after="seen"), spool, tmp_path)
    async with running(intake) as task:
        await wait_until(
            "first two seen",
            lambda: (
                row_count(spool) == 2 and all("\\Seen" in f for f, _ in mailbox.messages().values())
            ),
            task=task,
        )
        # A restored backup / rebuilt index: new UIDVALIDITY, flags lost, and one new mail.
        new = old + 1000
        await asyncio.to_thread(mailbox.set_flags, "INBOX", "(\\Seen)", add=False)
        await asyncio.to_thread(mailbox.set_uidvalidity, "INBOX", new)
        await asyncio.to_thread(mailbox.append, [make_message(3)])
        await wait_until(
            "stored under the new UIDVALIDITY", lambda: row_count(spool) == 5, task=task
        )
    got = rows(spool)
    by_key = {r[0]: message_ids([r[1]])[0] for r in got}
    old_keys = {k for k in by_key if k.startswith(f"imap:support:INBOX:{old}:")}
    new_keys = {k for k in by_key if k.startswith(f"imap:support:INBOX:{new}:")}
    assert len(old_keys) == 2 and len(new_keys) == 3
    # Nothing lost: every mail has a row under the new UIDVALIDITY. The two that were stored
    # before are duplicates by Message-ID and content: the worker's de-duplication drops them.
    assert sorted(by_key[k] for k in new_keys) == [f"msg-{i}@test.example" for i in (1, 2, 3)]
    changed = events(imap_log, "imap_uidvalidity_changed")
    assert changed and f"old={old} new={new}" in changed[0]


async def test_after_seen_flags_and_leaves_mail(
    mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path
) -> None:
    await asyncio.to_thread(mailbox.append, [make_message(i) for i in range(1, 4)])
    cfg = make_cfg(mailbox, after="seen")
    intake = make_intake(cfg, spool, tmp_path)
    async with running(intake) as task:
        await wait_until(
            "seen",
            lambda: (
                row_count(spool) == 3 and all("\\Seen" in f for f, _ in mailbox.messages().values())
            ),
            task=task,
        )
    assert mailbox.count("INBOX") == 3
    assert "Processed" not in mailbox.folders()
    # A second run finds nothing unseen: no new rows.
    again = make_intake(cfg, spool, tmp_path)
    async with running(again) as task:
        await asyncio.sleep(1.5)
        assert not task.done()
    assert row_count(spool) == 3 and again.stored == 0


async def test_after_delete_removes_mail(
    mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path
) -> None:
    await asyncio.to_thread(mailbox.append, [make_message(i) for i in range(1, 4)])
    intake = make_intake(make_cfg(mailbox, after="delete"), spool, tmp_path)
    async with running(intake) as task:
        await wait_until(
            "deleted", lambda: row_count(spool) == 3 and mailbox.count("INBOX") == 0, task=task
        )
    assert "Processed" not in mailbox.folders()


async def test_imaps_with_private_ca(mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path) -> None:
    await asyncio.to_thread(mailbox.append, [make_message(1)])
    cfg = make_cfg(
        mailbox, security="tls", port=mailbox.server.ssl_port, ca_file=str(mailbox.server.ca_file)
    )
    intake = make_intake(cfg, spool, tmp_path)
    async with running(intake) as task:
        await wait_until("stored over IMAPS", lambda: mailbox.count("INBOX") == 0, task=task)
    assert row_count(spool) == 1


async def test_starttls_with_private_ca_relative_path(
    mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path
) -> None:
    (tmp_path / "ca.pem").write_bytes(mailbox.server.ca_file.read_bytes())
    await asyncio.to_thread(mailbox.append, [make_message(1)])
    cfg = make_cfg(mailbox, security="starttls", ca_file="ca.pem")  # relative to base_dir
    intake = make_intake(cfg, spool, tmp_path)
    async with running(intake) as task:
        await wait_until("stored over STARTTLS", lambda: mailbox.count("INBOX") == 0, task=task)
    assert row_count(spool) == 1


@pytest.mark.parametrize("security", ["tls", "starttls"])
async def test_untrusted_certificate_is_refused_clearly(
    security: str,
    mailbox: Mailbox,
    spool: SqliteSpool,
    tmp_path: Path,
    imap_log: pytest.LogCaptureFixture,
) -> None:
    await asyncio.to_thread(mailbox.append, [make_message(1)])
    port = mailbox.server.ssl_port if security == "tls" else mailbox.server.port
    intake = make_intake(make_cfg(mailbox, security=security, port=port), spool, tmp_path)
    async with running(intake) as task:
        await wait_until("status down", lambda: not intake.status.ok, task=task)
        assert "certificate verification failed" in intake.status.detail
        assert "set ca_file" in intake.status.detail
        assert events(imap_log, "imap_tls_failed")
        assert not task.done()
    assert row_count(spool) == 0
    assert mailbox.count("INBOX") == 1


async def test_wrong_credentials(
    own_dovecot: DovecotServer,
    spool: SqliteSpool,
    tmp_path: Path,
    imap_log: pytest.LogCaptureFixture,
) -> None:
    # Own server: Dovecot's per-IP penalty after failed logins would slow the other tests.
    mailbox = own_dovecot.add_mailbox("creds@example.com")
    await asyncio.to_thread(mailbox.append, [make_message(1)])
    secret = tmp_path / "imap-password"
    secret.write_text("wrong-password\n")
    cfg = make_cfg(mailbox, password=None, password_file="imap-password")
    intake = make_intake(cfg, spool, tmp_path, login_retry=0.5, retry_cap=2.0)
    async with running(intake) as task:
        await wait_until("status down", lambda: not intake.status.ok, task=task)
        assert intake.status.detail.startswith("support/INBOX: login failed:")
        assert "AUTHENTICATIONFAILED" in intake.status.detail
        failed = events(imap_log, "imap_login_failed")
        assert failed and "mailbox=support" in failed[0] and "reason=" in failed[0]
        assert "wrong-password" not in imap_log.text
        # Retries continue, slowly: from 0.5 s doubling (Dovecot adds its own failure delay and
        # a growing per-IP penalty), so a few attempts in seconds, never a tight loop.
        t0 = time.monotonic()
        await wait_until("a second attempt", lambda: intake.login_failures >= 2, task=task)
        await asyncio.sleep(1.0)
        assert not task.done()
        assert intake.login_failures <= 2 + (time.monotonic() - t0) / 0.5, intake.login_failures
        # Fixing the secret file is picked up by the next attempt.
        secret.write_text(mailbox.password + "\n")
        await wait_until("stored", lambda: row_count(spool) == 1, task=task)
        assert intake.status.ok
    assert "wrong-password" not in imap_log.text and mailbox.password not in imap_log.text


async def test_wrong_credentials_default_backoff_is_slow(
    own_dovecot: DovecotServer,
    spool: SqliteSpool,
    tmp_path: Path,
    imap_log: pytest.LogCaptureFixture,
) -> None:
    mailbox = own_dovecot.add_mailbox("creds@example.com")
    cfg = make_cfg(mailbox, password="nope")
    intake = ImapIntake(cfg, spool, Component("imap:support", "intake"), base_dir=tmp_path)
    async with running(intake) as task:
        await wait_until(
            "reconnect scheduled", lambda: bool(events(imap_log, "imap_reconnect")), task=task
        )
        delay = float(re.search(r"in_seconds=([\d.]+)", events(imap_log, "imap_reconnect")[0])[1])  # type: ignore[index]
        assert delay >= 30
        assert intake.login_failures == 1
        assert not intake.status.ok


class FlakySpool:
    """A real spool whose first `fail` puts raise SpoolError."""

    def __init__(self, inner: SqliteSpool, fail: int) -> None:
        self.inner = inner
        self.fail = fail

    async def put(
        self, raw: bytes, envelope: Envelope, *, source_key: str | None = None
    ) -> PutResult:
        if self.fail > 0:
            self.fail -= 1
            raise SpoolError("spool commit failed: disk I/O error (simulated)")
        return await self.inner.put(raw, envelope, source_key=source_key)

    async def has_source_key(self, source_key: str) -> bool:
        return await self.inner.has_source_key(source_key)

    async def known_source_keys(self, source_keys: Collection[str]) -> set[str]:
        return await self.inner.known_source_keys(source_keys)

    async def close(self) -> None:
        await self.inner.close()


class SlowSpool(FlakySpool):
    """A real spool whose puts take `delay` seconds longer."""

    def __init__(self, inner: SqliteSpool, delay: float) -> None:
        super().__init__(inner, fail=0)
        self.delay = delay

    async def put(
        self, raw: bytes, envelope: Envelope, *, source_key: str | None = None
    ) -> PutResult:
        await asyncio.sleep(self.delay)
        return await super().put(raw, envelope, source_key=source_key)


async def test_spool_error_leaves_message_untouched(
    mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path, imap_log: pytest.LogCaptureFixture
) -> None:
    await asyncio.to_thread(mailbox.append, [make_message(1)])
    await spool.close()
    intake = make_intake(make_cfg(mailbox, after="seen"), spool, tmp_path, spool_retry_cap=0.3)
    async with running(intake) as task:
        await wait_until(
            "two failed tries", lambda: len(events(imap_log, "imap_spool_failed")) >= 2, task=task
        )
        assert not intake.status.ok and "spool unavailable" in intake.status.detail
        assert not task.done()
    msgs = mailbox.messages()
    assert len(msgs) == 1
    assert not any("\\Seen" in f for f, _ in msgs.values())


async def test_spool_error_then_recovery_stores_once(
    mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path
) -> None:
    await asyncio.to_thread(mailbox.append, [make_message(i) for i in range(1, 4)])
    flaky = FlakySpool(spool, fail=2)
    intake = make_intake(make_cfg(mailbox), flaky, tmp_path, spool_retry_cap=0.3)
    async with running(intake) as task:
        await wait_until(
            "stored after retries",
            lambda: row_count(spool) == 3 and mailbox.count("INBOX") == 0,
            task=task,
        )
        await wait_until("status ok again", lambda: intake.status.ok, task=task)
    assert len({r[0] for r in rows(spool)}) == 3


async def test_too_large_mail_is_left_in_folder(
    mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path, imap_log: pytest.LogCaptureFixture
) -> None:
    await asyncio.to_thread(mailbox.append, [make_message(1, size=4000), make_message(2)])
    intake = make_intake(make_cfg(mailbox, max_size=2048), spool, tmp_path)
    async with running(intake) as task:
        await wait_until("small one stored", lambda: row_count(spool) == 1, task=task)
        await wait_until(
            "reported", lambda: bool(events(imap_log, "imap_message_too_large")), task=task
        )
    assert mailbox.count("INBOX") == 1
    assert len(events(imap_log, "imap_message_too_large")) == 1


async def test_two_folders_each_own_connection(
    mailbox: Mailbox, spool: SqliteSpool, tmp_path: Path
) -> None:
    await asyncio.to_thread(mailbox.create_folder, "Support Requests")
    await asyncio.to_thread(mailbox.append, [make_message(1)])
    await asyncio.to_thread(mailbox.append, [make_message(2)], "Support Requests")
    cfg = make_cfg(mailbox, folders=["INBOX", "Support Requests"])
    intake = make_intake(cfg, spool, tmp_path)
    async with running(intake) as task:
        await wait_until("both stored", lambda: row_count(spool) == 2, task=task)
    keys = sorted(r[0] for r in rows(spool))
    assert keys[0].startswith("imap:support:INBOX:")
    assert keys[1].startswith("imap:support:Support Requests:")
    assert intake.connects == 2


async def test_oauth2_token_sources(tmp_path: Path, mailbox: Mailbox, spool: SqliteSpool) -> None:
    (tmp_path / "token").write_text("tok-from-file\n")
    cfg = make_cfg(mailbox, password=None, auth="xoauth2", oauth2_token_file="token")
    assert await make_intake(cfg, spool, tmp_path)._oauth2_token() == "tok-from-file"
    cfg = make_cfg(
        mailbox, password=None, auth="xoauth2", oauth2_token_command=["sh", "-c", "echo tok-cmd"]
    )
    assert await make_intake(cfg, spool, tmp_path)._oauth2_token() == "tok-cmd"
    cfg = make_cfg(
        mailbox, password=None, auth="xoauth2", oauth2_token_command="sh -c 'echo oops >&2; exit 3'"
    )
    with pytest.raises(Exception, match="exited with 3: oops"):
        await make_intake(cfg, spool, tmp_path)._oauth2_token()


@pytest.fixture
def oauth2() -> Iterator[tuple[DovecotServer, TokenIntrospection]]:
    """A private Dovecot whose XOAUTH2 tokens are checked by a loopback introspection endpoint."""
    tokens = TokenIntrospection()
    server = _start_dovecot(oauth2_url=tokens.url)
    yield server, tokens
    server.cleanup()
    tokens.close()


async def test_xoauth2_token_file_refreshed_per_connection(
    oauth2: tuple[DovecotServer, TokenIntrospection], spool: SqliteSpool, tmp_path: Path
) -> None:
    server, tokens = oauth2
    mb = server.add_mailbox("oauth@example.com")
    tokens.tokens = {"access-1": mb.username}
    (tmp_path / "token").write_text("access-1\n")
    await asyncio.to_thread(mb.append, [make_message(1)])
    cfg = make_cfg(mb, password=None, auth="xoauth2", oauth2_token_file="token")
    intake = make_intake(cfg, spool, tmp_path)
    async with running(intake) as task:
        await wait_until("first mail", lambda: row_count(spool) == 1, task=task)
        # The token expires and a helper writes the next one; the server drops the session.
        tokens.tokens = {"access-2": mb.username}
        (tmp_path / "token").write_text("access-2\n")
        await asyncio.to_thread(server.restart)
        await asyncio.to_thread(mb.append, [make_message(2)])
        await wait_until("second mail with the new token", lambda: row_count(spool) == 2, task=task)
    assert intake.login_failures == 0


async def test_xoauth2_refused_token_is_a_login_failure(
    oauth2: tuple[DovecotServer, TokenIntrospection],
    spool: SqliteSpool,
    tmp_path: Path,
    imap_log: pytest.LogCaptureFixture,
) -> None:
    server, tokens = oauth2
    mb = server.add_mailbox("oauth@example.com")
    tokens.tokens = {"right": mb.username}
    cfg = make_cfg(mb, password=None, auth="xoauth2", oauth2_token_command="echo wrong-token")
    intake = make_intake(cfg, spool, tmp_path, login_retry=5.0)
    async with running(intake) as task:
        # The server answers a refused XOAUTH2 with a JSON challenge first: the intake must
        # answer it and get the NO, not hang until the command timeout.
        await wait_until("status down", lambda: not intake.status.ok, timeout=20, task=task)
        assert "login failed" in intake.status.detail
        assert events(imap_log, "imap_login_failed")
    assert "wrong-token" not in imap_log.text
    assert tokens.calls >= 1
