"""The backends' HTTP client (httpx's own transport as `make_client` sets it up) against a real
socket server on loopback that answers from a script: keep-alive, chunked and read-to-close
bodies, interim answers, dead connections, timeouts, large bodies and TLS. Errors must be httpx's
own classes (the backends map those, `gateway.backends.http.transport_error`)."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from gateway.backends.http import make_client

Responder = Callable[[bytes, bytes], bytes | None]  # (request head, body) -> raw answer or None


@dataclass
class Server:
    port: int
    connections: int = 0
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)
    close_after: bool = False  # close each connection after its answer, without saying so
    writers: list[asyncio.StreamWriter] = field(default_factory=list)
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await reader.readexactly(length) if length else b""
    return head, body


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., asyncio.Future[Server]]]:
    servers: list[asyncio.base_events.Server] = []

    async def start(respond: Responder, *, tls: ssl.SSLContext | None = None) -> Server:
        state = Server(port=0, tls=tls is not None)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            state.connections += 1
            state.writers.append(writer)
            try:
                while True:
                    req = await _read_request(reader)
                    if req is None:
                        return
                    state.requests.append(req)
                    answer = respond(*req)
                    if answer is None:  # hang up without an answer
                        return
                    if answer == b"<stall>":
                        await asyncio.sleep(30)
                        return
                    writer.write(answer)
                    await writer.drain()
                    if state.close_after:
                        return
            finally:
                writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=tls)
        servers.append(server)
        state.port = server.sockets[0].getsockname()[1]
        return state

    yield start  # type: ignore[misc]
    for s in servers:
        s.close()


def ok(body: bytes = b"hello", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


async def test_keep_alive_connection_is_reused_for_the_next_request(serve) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda head, body: ok(b"answer to " + body))
    async with make_client(timeout=5, concurrency=4) as client:
        for i in range(5):
            r = await client.post(srv.url + "/soap?x=1", content=b"call %d" % i)
            assert r.status_code == 200
            assert r.content == b"answer to call %d" % i
    assert srv.connections == 1
    head = srv.requests[0][0]
    assert head.startswith(b"POST /soap?x=1 HTTP/1.1\r\n")
    assert b"\r\nHost: 127.0.0.1:" in head


async def test_chunked_body_with_extensions_and_trailers_is_joined(serve) -> None:  # type: ignore[no-untyped-def]
    answer = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/xml\r\n\r\n"
        b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: yes\r\n\r\n"
    )
    srv = await serve(lambda head, body: answer)
    async with make_client(timeout=5, concurrency=1) as client:
        r1 = await client.get(srv.url)
        r2 = await client.get(srv.url)
    assert r1.text == r2.text == "hello, world"
    assert r1.headers["content-type"] == "text/xml"
    assert srv.connections == 1


async def test_body_without_length_is_read_until_the_server_closes(serve) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda head, body: b"HTTP/1.0 200 OK\r\n\r\nold style body")
    srv.close_after = True
    async with make_client(timeout=5, concurrency=1) as client:
        assert (await client.get(srv.url)).text == "old style body"
        assert (await client.get(srv.url)).text == "old style body"
    assert srv.connections == 2


async def test_interim_100_and_empty_204_answers(serve) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(
        lambda head, body: (
            b"HTTP/1.1 100 Continue\r\n\r\n"
            + (b"HTTP/1.1 204 No Content\r\n\r\n" if b"DELETE" in head else ok(b"after 100"))
        )
    )
    async with make_client(timeout=5, concurrency=1) as client:
        assert (await client.post(srv.url, content=b"x")).text == "after 100"
        r = await client.delete(srv.url)
        assert r.status_code == 204 and r.content == b""
        assert (await client.post(srv.url, content=b"y")).text == "after 100"
    assert srv.connections == 1


async def test_connection_the_server_closed_while_idle_is_not_reused(serve) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda head, body: ok())
    srv.close_after = True  # keep-alive announced, then closed after each answer
    async with make_client(timeout=5, concurrency=1) as client:
        for _ in range(3):
            assert (await client.get(srv.url)).status_code == 200
            await asyncio.sleep(0.05)  # the close reaches the client while idle
    assert srv.connections == 3
    assert len(srv.requests) == 3


async def test_hang_up_without_answer_is_an_error_and_not_sent_twice(serve) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda head, body: None)
    async with make_client(timeout=5, concurrency=1) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(srv.url, content=b"create ticket")
    assert len(srv.requests) == 1


async def test_truncated_body_is_an_error(serve) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda head, body: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
    srv.close_after = True
    async with make_client(timeout=5, concurrency=1) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(srv.url)


async def test_garbage_answer_is_a_protocol_error(serve) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda head, body: b"SSH-2.0-OpenSSH\r\n\r\n")
    async with make_client(timeout=5, concurrency=1) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(srv.url)


async def test_silent_server_gives_read_timeout(serve) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda head, body: b"<stall>")
    async with make_client(timeout=0.3, concurrency=1) as client:
        with pytest.raises(httpx.ReadTimeout):
            await client.get(srv.url)


async def test_refused_connection_gives_connect_error() -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with make_client(timeout=2, concurrency=1) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(f"http://127.0.0.1:{port}/")


async def test_pool_timeout_when_every_connection_is_busy(serve) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda head, body: b"<stall>")
    transport = httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=1))
    client = httpx.AsyncClient(timeout=httpx.Timeout(5, pool=0.2), transport=transport)
    async with client:
        first = asyncio.create_task(client.get(srv.url))
        await asyncio.sleep(0.1)
        with pytest.raises(httpx.PoolTimeout):
            await client.get(srv.url)
        first.cancel()


async def test_large_bodies_both_ways_arrive_whole(serve) -> None:  # type: ignore[no-untyped-def]
    big = bytes(range(256)) * (12 * 1024)  # 3 MiB, above the write chunk
    srv = await serve(lambda head, body: ok(body[::-1]))
    async with make_client(timeout=10, concurrency=2) as client:
        r = await client.post(srv.url, content=big)
    assert srv.requests[0][1] == big
    assert r.content == big[::-1]


async def test_concurrent_requests_each_get_their_own_answer(serve) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda head, body: ok(b"re: " + body))
    async with make_client(timeout=5, concurrency=4) as client:
        rs = await asyncio.gather(*(client.post(srv.url, content=b"%d" % i) for i in range(40)))
    assert [r.content for r in rs] == [b"re: %d" % i for i in range(40)]
    assert srv.connections <= 4


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl for the test CA")
async def test_tls_with_a_private_ca_and_host_check(serve, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.imap_server import make_tls

    ca, crt, key = make_tls(tmp_path / "tls")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(crt, key)
    srv = await serve(lambda head, body: ok(b"secure"), tls=server_ctx)
    trusting = ssl.create_default_context(cafile=str(ca))
    async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(verify=trusting)) as client:
        assert (await client.get(srv.url)).text == "secure"
    # the system's CAs do not know the test CA: refused, as a connect error
    async with make_client(timeout=5, concurrency=1) as client:
        with pytest.raises(httpx.ConnectError):
            await client.get(srv.url)


async def test_streamed_body_of_known_length_arrives_whole(serve) -> None:  # type: ignore[no-untyped-def]
    srv = await serve(lambda head, body: ok(b"%d" % len(body)))
    pieces = [b"a" * 100_000, b"b" * 300_000, b"c"]

    async def gen():  # type: ignore[no-untyped-def]
        for p in pieces:
            yield p

    async with make_client(timeout=5, concurrency=1) as client:
        r = await client.post(
            srv.url, content=gen(), headers={"Content-Length": str(sum(map(len, pieces)))}
        )
        assert r.text == "400001"
        assert srv.requests[0][1] == b"".join(pieces)
        assert b"transfer-encoding" not in srv.requests[0][0].lower()
        # a body that breaks its promised length is an error, not a request of another size
        with pytest.raises(httpx.TransportError):
            await client.post(srv.url, content=gen(), headers={"Content-Length": "5"})


async def test_soap_attachment_goes_out_base64_in_place_of_its_stand_in(serve) -> None:  # type: ignore[no-untyped-def]
    import base64
    import os

    from lxml import etree

    from gateway.backends.superoffice_soap import _Transport

    srv = await serve(lambda head, body: ok(b"<r/>", b"Content-Type: text/xml\r\n"))
    data = os.urandom(1_000_001)
    async with make_client(timeout=5, concurrency=1) as client:
        transport = _Transport(client=client)
        marker = transport.stand_in(data)
        envelope = etree.fromstring(f"<e><name>f.bin</name><content>{marker}</content></e>")
        await transport.post_xml(srv.url, envelope, {"Content-Type": "text/xml"})
        transport.release(marker)
    body = srv.requests[0][1]
    expected = f"<e><name>f.bin</name><content>{base64.b64encode(data).decode()}</content></e>"
    assert body.decode().split("?>", 1)[-1].strip() == expected  # after the XML declaration


async def test_idle_connection_closed_while_the_loop_was_busy_is_not_reused(serve) -> None:  # type: ignore[no-untyped-def]
    import socket
    import time

    srv = await serve(lambda head, body: ok())
    async with make_client(timeout=5, concurrency=1) as client:
        assert (await client.get(srv.url)).status_code == 200
        # the server hangs up on the idle connection while this loop is blocked (parsing a big
        # mail, say): the loop has not seen the close when the next request picks a connection
        for writer in srv.writers:  # at once, not through the (blocked) event loop
            writer.get_extra_info("socket").shutdown(socket.SHUT_RDWR)
        time.sleep(0.3)  # noqa: ASYNC251 (the point: the loop is blocked meanwhile)
        assert (await client.get(srv.url)).status_code == 200
    assert srv.connections == 2
