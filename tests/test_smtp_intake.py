"""SMTP intake against real clients: RCPT policy, SIZE, 250 only after the spool commit, 451."""

from __future__ import annotations

import asyncio
import os
import smtplib
import subprocess
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
    await spool.close()


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
    row = await spool.load(msg_id, with_raw=True)
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
    assert await spool.list_messages() == []


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
    assert await spool.list_messages() == []


async def test_spool_failure_answers_451(intake: tuple[SmtpListener, SqliteSpool]) -> None:
    listener, spool = intake
    await spool.close()  # the spool can no longer commit
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


async def _send_raw_data(port: int, data: bytes, *, after: bytes = b"") -> list[bytes]:
    """EHLO, MAIL, RCPT, DATA, then `data` (already dot-stuffed, with its end marker) and
    `after` in the same write; returns the reply lines from DATA's 354 on."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out: list[bytes] = []

    async def reply() -> bytes:
        while True:
            line = await asyncio.wait_for(reader.readline(), 10)
            if line[3:4] != b"-":
                return line

    await reply()
    for cmd in (b"EHLO c.test", b"MAIL FROM:<c@example.org>", b"RCPT TO:<support@example.com>"):
        writer.write(cmd + b"\r\n")
        assert (await reply()).startswith(b"250")
    writer.write(b"DATA\r\n")
    out.append(await reply())
    writer.write(data + after)
    await writer.drain()
    out.append(await reply())
    if after:
        out.append(await reply())
    writer.close()
    return out


def _queued_id(reply: bytes) -> int:
    assert reply.startswith(b"250 "), reply
    return int(reply.rsplit(b" ", 1)[1])


async def test_dot_stuffed_lines_come_back_unstuffed(
    intake: tuple[SmtpListener, SqliteSpool],
) -> None:
    listener, spool = intake
    body = b"Subject: dots\r\n\r\n.NET is here\r\n..double\r\n.\r\nnot the end\r\nlast"
    stuffed = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln for ln in body.split(b"\r\n"))
    replies = await _send_raw_data(listener.port, stuffed + b"\r\n.\r\n")
    assert replies[0].startswith(b"354")
    row = await spool.load(_queued_id(replies[1]), with_raw=True)
    assert row is not None and row.raw == body + b"\r\n"


async def test_first_line_starting_with_a_dot_and_an_empty_mail(
    intake: tuple[SmtpListener, SqliteSpool],
) -> None:
    listener, spool = intake
    replies = await _send_raw_data(listener.port, b"..first\r\nsecond\r\n.\r\n")
    row = await spool.load(_queued_id(replies[1]), with_raw=True)
    assert row is not None and row.raw == b".first\r\nsecond\r\n"
    replies = await _send_raw_data(listener.port, b".\r\n")
    row = await spool.load(_queued_id(replies[1]), with_raw=True)
    assert row is not None and row.raw == b""


async def test_large_mail_in_many_packets_arrives_byte_for_byte(
    intake: tuple[SmtpListener, SqliteSpool],
) -> None:
    listener, spool = intake
    lines = [b"Subject: big", b""] + [
        (b"." if i % 7 == 0 else b"") + b"line %05d " % i + b"x" * (i % 90) for i in range(700)
    ]
    body = b"\r\n".join(lines) + b"\r\n"
    assert len(body) < 64 * 1024
    _errors, response = await aiosmtplib.send(
        body,
        sender="c@example.org",
        recipients=["support@example.com"],
        hostname="127.0.0.1",
        port=listener.port,
    )
    row = await spool.load(int(response.rsplit(" ", 1)[1]), with_raw=True)
    assert row is not None and row.raw == body


async def test_line_longer_than_1000_octets_is_kept_not_refused(
    intake: tuple[SmtpListener, SqliteSpool],
) -> None:
    listener, spool = intake
    body = b"Subject: long\r\n\r\n<html>" + b"a" * 5000 + b"</html>\r\n"
    replies = await _send_raw_data(listener.port, body + b".\r\n")
    row = await spool.load(_queued_id(replies[1]), with_raw=True)
    assert row is not None and row.raw == body


async def test_data_over_the_size_limit_gets_552_and_the_session_goes_on(
    intake: tuple[SmtpListener, SqliteSpool],
) -> None:
    listener, spool = intake
    big = b"Subject: huge\r\n\r\n" + (b"y" * 998 + b"\r\n") * 100  # ~100 KiB > 64 KiB
    replies = await _send_raw_data(listener.port, big + b".\r\n", after=b"NOOP\r\n")
    assert replies[1].startswith(b"552")
    assert replies[2].startswith(b"250")  # NOOP: still in step with the client
    assert await spool.list_messages() == []


async def test_commands_pipelined_after_the_end_marker_are_answered(
    intake: tuple[SmtpListener, SqliteSpool],
) -> None:
    listener, spool = intake
    replies = await _send_raw_data(
        listener.port, b"Subject: p\r\n\r\nbody\r\n.\r\n", after=b"QUIT\r\n"
    )
    assert replies[1].startswith(b"250 ")
    assert replies[2].startswith(b"221")
    row = await spool.load(_queued_id(replies[1]), with_raw=True)
    assert row is not None and row.raw == b"Subject: p\r\n\r\nbody\r\n"


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
    )
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


async def test_full_disk_answers_452_and_the_next_mail_fits_again(tmp_path: Path) -> None:
    disk = tmp_path / "small"
    if os.geteuid() != 0 or not _mount_tmpfs(disk, "1m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        spool = SqliteSpool(disk / "spool.sqlite")
        handler = IntakeHandler(spool, {"support@example.com"})
        listener = SmtpListener(handler, "127.0.0.1", 0, hostname="gw.test", max_size=4 << 20)
        await listener.start()
        try:
            filler = disk / "filler"
            filler.write_bytes(b"\0" * (1024 * 1024 - 200 * 1024))  # leave about 200 KiB
            big = b"Subject: big\r\n\r\n" + (b"z" * 998 + b"\r\n") * 600  # ~600 KiB
            with pytest.raises(aiosmtplib.SMTPDataError) as exc:
                await aiosmtplib.send(
                    big,
                    sender="c@example.org",
                    recipients=["support@example.com"],
                    hostname="127.0.0.1",
                    port=listener.port,
                )
            assert exc.value.code == 452 and "4.3.1" in exc.value.message
            filler.unlink()  # space again: the spool takes mail as before
            await aiosmtplib.send(
                MAIL,
                sender="c@example.org",
                recipients=["support@example.com"],
                hostname="127.0.0.1",
                port=listener.port,
            )
            assert len(await spool.list_messages()) == 1
        finally:
            await listener.stop(grace=0.5)
            await spool.close()
    finally:
        _umount(disk)
