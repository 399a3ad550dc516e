"""SMTP intake against real clients: RCPT policy, SIZE, 250 only after the spool commit, 451."""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import AsyncIterator
from pathlib import Path

import aiosmtplib
import pytest

from gateway.intake.smtp import IntakeHandler, SmtpListener
from gateway.spool.sqlite import SqliteSpool

MAIL = b"From: Customer <customer@example.org>\r\nTo: support@example.com\r\nSubject: Help\r\n\r\nPlease help\r\n"


@pytest.fixture
async def intake(tmp_path: Path) -> AsyncIterator[tuple[SmtpListener, SqliteSpool]]:
    spool = SqliteSpool(tmp_path / "spool.sqlite")
    handler = IntakeHandler(spool, {"support@example.com", "sales@example.com"})
    listener = SmtpListener(
        handler, "127.0.0.1", 0, hostname="gw.test", max_size=64 * 1024, max_per_ip=4
    )
    await listener.start()
    yield listener, spool
    await listener.stop(grace=0.5)
    spool.close_sync()


async def test_accepted_mail_is_in_the_spool_when_250_arrives(
    intake: tuple[SmtpListener, SqliteSpool],
) -> None:
    listener, spool = intake
    errors, response = await aiosmtplib.send(
        MAIL,
        sender="customer@example.org",
        recipients=["Support@Example.com"],
        hostname="127.0.0.1",
        port=listener.port,
    )
    assert errors == {}
    assert response.startswith("2.0.0 Ok: queued as ")
    msg_id = int(response.rsplit(" ", 1)[1])
    row = spool.get_sync(msg_id, with_raw=True)
    assert row is not None and row.raw == MAIL
    assert row.envelope.rcpt_tos == ("support@example.com",)
    assert row.envelope.mail_from == "customer@example.org"
    assert row.envelope.peer == "127.0.0.1"


async def test_unknown_recipient_gets_550_and_nothing_is_spooled(
    intake: tuple[SmtpListener, SqliteSpool],
) -> None:
    listener, spool = intake

    def send() -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", listener.port) as s:
            s.ehlo()
            s.mail("customer@example.org")
            return s.rcpt("someone@elsewhere.example")

    code, msg = await asyncio.to_thread(send)
    assert code == 550 and b"5.1.1" in msg
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await aiosmtplib.send(
            MAIL,
            sender="x@example.org",
            recipients=["relay@victim.example"],
            hostname="127.0.0.1",
            port=listener.port,
        )
    assert spool.list_sync() == []


async def test_size_is_advertised_and_enforced(intake: tuple[SmtpListener, SqliteSpool]) -> None:
    listener, spool = intake

    def send() -> tuple[str, int]:
        with smtplib.SMTP("127.0.0.1", listener.port) as s:
            s.ehlo()
            size = s.esmtp_features.get("size", "")
            try:
                s.sendmail("c@example.org", ["support@example.com"], MAIL + b"x" * 70_000)
            except smtplib.SMTPResponseException as exc:
                return size, exc.smtp_code
            except smtplib.SMTPSenderRefused as exc:
                return size, exc.smtp_code
            return size, 250

    size, code = await asyncio.to_thread(send)
    assert size == str(64 * 1024)
    assert code == 552
    assert spool.list_sync() == []


async def test_spool_failure_answers_451(intake: tuple[SmtpListener, SqliteSpool]) -> None:
    listener, spool = intake
    spool.close_sync()  # the spool can no longer commit
    with pytest.raises(aiosmtplib.SMTPDataError) as exc:
        await aiosmtplib.send(
            MAIL,
            sender="c@example.org",
            recipients=["support@example.com"],
            hostname="127.0.0.1",
            port=listener.port,
        )
    assert exc.value.code == 451


async def test_draining_listener_answers_421(intake: tuple[SmtpListener, SqliteSpool]) -> None:
    listener, _ = intake
    listener.drain()
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as exc:
        await aiosmtplib.send(
            MAIL,
            sender="c@example.org",
            recipients=["support@example.com"],
            hostname="127.0.0.1",
            port=listener.port,
        )
    assert exc.value.code == 421


async def test_per_ip_connection_limit(intake: tuple[SmtpListener, SqliteSpool]) -> None:
    listener, _ = intake
    clients = [aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port) for _ in range(4)]
    for c in clients:
        await c.connect()
    with pytest.raises(aiosmtplib.SMTPConnectResponseError) as exc:
        extra = aiosmtplib.SMTP(hostname="127.0.0.1", port=listener.port)
        await extra.connect()
    assert exc.value.code == 421
    for c in clients:
        await c.quit()
