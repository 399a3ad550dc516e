"""Backend answers are bounded (per answer and for all answers in flight), and one HTTP status
table maps outcomes into the error tree for every backend."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from gateway.backends.http import (
    ResponseBudget,
    ResponseTooLarge,
    make_client,
    retry_after,
    status_error,
    transport_error,
)
from gateway.errors import BackendUnavailable, PermanentError, TransientError


async def _endless_chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request with a chunked body that never ends."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        while True:
            writer.write(chunk)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


@pytest.fixture
async def endless() -> AsyncIterator[str]:
    server = await asyncio.start_server(_endless_chunked, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    server.close()


async def test_endless_chunked_answer_stops_at_the_cap(endless: str) -> None:
    budget = ResponseBudget(1 << 30)
    async with make_client(
        timeout=5, concurrency=1, max_response_bytes=1 << 20, budget=budget
    ) as client:
        started = time.monotonic()
        with pytest.raises(ResponseTooLarge, match="max_response_bytes") as info:
            await client.get(endless)
        assert time.monotonic() - started < 5
    assert isinstance(transport_error("x", info.value), TransientError)
    assert budget.held == 0  # given back when the answer was dropped


async def test_declared_length_past_the_cap_is_refused_before_reading() -> None:
    async def big(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\nxx")
        await writer.drain()
        await asyncio.sleep(1)
        writer.close()

    server = await asyncio.start_server(big, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    try:
        async with make_client(timeout=5, concurrency=1, max_response_bytes=1 << 20) as client:
            with pytest.raises(ResponseTooLarge):
                await client.get(url)
    finally:
        server.close()


async def test_all_calls_in_flight_share_one_budget(endless: str) -> None:
    budget = ResponseBudget(4 << 20)
    clients = [
        make_client(timeout=5, concurrency=4, max_response_bytes=64 << 20, budget=budget)
        for _ in range(2)
    ]
    try:
        results = await asyncio.gather(
            *(c.get(endless) for c in clients for _ in range(4)), return_exceptions=True
        )
    finally:
        for c in clients:
            await c.aclose()
    assert all(isinstance(r, ResponseTooLarge) for r in results), results
    assert any("in flight" in str(r) for r in results)
    assert budget.held == 0


async def test_small_answers_pass_and_give_their_bytes_back() -> None:
    async def small(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(small, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    budget = ResponseBudget(10)
    try:
        async with make_client(timeout=5, concurrency=2, budget=budget) as client:
            for _ in range(5):
                assert (await client.get(url)).text == "hello"
    finally:
        server.close()
    assert budget.held == 0


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (500, TransientError),
        (502, TransientError),
        (503, TransientError),
        (408, TransientError),
        (425, TransientError),
        (429, TransientError),
        (401, BackendUnavailable),
        (403, BackendUnavailable),
        (407, BackendUnavailable),
        (404, BackendUnavailable),
        (405, BackendUnavailable),
        (410, BackendUnavailable),
        (302, BackendUnavailable),
        (400, PermanentError),
        (409, PermanentError),
        (413, PermanentError),
        (422, PermanentError),
    ],
)
def test_one_status_table_for_every_backend(status: int, kind: type) -> None:
    err = status_error("X op", status, {"retry-after": "7"})
    assert type(err) is kind
    assert str(err).startswith(f"X op: HTTP {status}")
    assert err.retry_after == (7.0 if kind is TransientError else None)


def test_retry_after_seconds_and_http_dates() -> None:
    assert retry_after("120") == 120.0
    assert retry_after("-3") == 0.0
    assert retry_after(None) is None and retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 60, usegmt=True)
    assert 55 <= (retry_after(later) or 0) <= 61
    assert retry_after("Wed, 21 Oct 2015 07:28:00 -0000") == 0.0


def test_transport_failures_map_to_the_tree() -> None:
    req = httpx.Request("GET", "http://127.0.0.1/")
    assert isinstance(transport_error("x", httpx.ReadTimeout("t", request=req)), TransientError)
    assert isinstance(transport_error("x", httpx.ConnectError("c", request=req)), TransientError)
    assert isinstance(
        transport_error("x", httpx.UnsupportedProtocol("ftp", request=req)), BackendUnavailable
    )
    assert isinstance(transport_error("x", httpx.InvalidURL("bad")), BackendUnavailable)
