"""The HTTP client every backend uses: `httpx.AsyncClient` over a small HTTP/1.1 transport of ours.

Why not httpx's default transport (httpcore over anyio and h11): measured in the worker, it cost
more CPU per SOAP call than zeep's own work. Per request it asks the socket for its peer name
through anyio's attribute layer, polls every idle connection to see whether it is still open,
walks every waiting request of the pool, and writes the head and the body in two sends.

Here each connection is an asyncio `Protocol`: the event loop says when the server closed it, and
one poll of the socket before reuse catches a close the loop has not handled yet; the request
leaves in one write (large bodies in chunks, with the transport's flow control); the response is
parsed from the received buffer.

Supported: HTTP/1.1 and 1.0 responses with Content-Length, chunked or read-to-close bodies;
keep-alive with an idle expiry; TLS (the system's CAs unless a context is given, SNI, host name
checked); httpx's connect, read, write and pool timeouts, and httpx's exception classes, so the
backends handle errors exactly as with httpx's own transport. Proxies from the environment keep
working: httpx mounts its own proxy transports beside this one. Not supported: HTTP/2, upgrades.
A request is never sent twice: a connection that fails after the request went out is an error
for the caller (the backends decide whether the call may have taken effect).
"""

from __future__ import annotations

import asyncio
import select
import ssl
import time
from collections.abc import AsyncIterable, Iterable
from typing import Any

import httpx

MAX_HEAD = 64 * 1024  # bytes of status line + headers
MAX_BODY = 64 * 1024 * 1024  # a backend's answer is small; this guards memory, not size
WRITE_CHUNK = 256 * 1024  # large bodies go out in pieces (asyncio would copy the rest)
KEEPALIVE_EXPIRY = 5.0  # seconds an idle connection may wait for reuse


class _ProtocolError(Exception):
    pass


class StreamBody:
    """A request body sent piece by piece as the caller's async iterator yields it."""

    def __init__(self, stream: AsyncIterable[bytes], length: int) -> None:
        self.stream, self.length = stream, length


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one exchange at a time, parsed as the bytes arrive."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._buf = bytearray()
        self._waiter: asyncio.Future[httpx.Response] | None = None
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reset(b"GET")

    def _reset(self, method: bytes) -> None:
        self._method = method
        self._phase = 0  # 0 head, 1 body, 2 chunk size, 3 chunk data, 4 chunk CRLF, 5 trailer
        self._status = 0
        self._reason = b""
        self._version = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._mode = ""  # "length", "chunked", "close"
        self._remaining = 0
        self._body = bytearray()
        self.keep_alive = False

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            self._close()  # bytes nobody asked for: this connection cannot be trusted
            return
        self._buf += data
        try:
            self._parse()
        except _ProtocolError as exc:
            self._fail(httpx.RemoteProtocolError(str(exc)))

    def eof_received(self) -> bool:
        if self._waiter is not None and not self._waiter.done():
            if self._phase == 1 and self._mode == "close":
                self._complete()
            else:
                self._fail(
                    httpx.RemoteProtocolError(
                        "Server disconnected without sending a response."
                        if self._phase == 0 and not self._buf
                        else "peer closed connection without sending complete message body"
                    )
                )
        self._close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._can_write.set()
        if self._waiter is not None and not self._waiter.done():
            if exc is None:
                self._fail(httpx.RemoteProtocolError("Server disconnected."))
            else:
                self._fail(httpx.ReadError(str(exc) or type(exc).__name__))

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    # -- one exchange ------------------------------------------------------------------------------

    async def exchange(
        self,
        method: bytes,
        head: bytes,
        body: bytes | StreamBody,
        timeouts: dict[str, Any],
    ) -> httpx.Response:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self._reset(method)
        self._buf.clear()
        waiter: asyncio.Future[httpx.Response] = loop.create_future()
        self._waiter = waiter
        try:
            if isinstance(body, StreamBody):
                await self._write_stream(head, body, timeouts.get("write"))
            elif len(body) <= WRITE_CHUNK:
                self.transport.write(head + body)
            else:
                await self._write_large(head, body, timeouts.get("write"))
            if self.closed and not waiter.done():
                raise httpx.WriteError("connection closed while sending the request")
            try:
                return await asyncio.wait_for(waiter, timeouts.get("read"))
            except TimeoutError:
                raise httpx.ReadTimeout("timed out waiting for the response") from None
        except BaseException:
            self._close()  # half an exchange: never reuse
            raise
        finally:
            self._waiter = None

    async def _write_stream(self, head: bytes, body: StreamBody, timeout: float | None) -> None:
        assert self.transport is not None
        self.transport.write(head)
        sent = 0
        async for chunk in body.stream:
            await self._writable(timeout)
            self.transport.write(chunk)
            sent += len(chunk)
        if sent != body.length:  # the head promised another length: this connection is spoilt
            raise httpx.WriteError(f"request body was {sent} bytes, not {body.length}")

    async def _writable(self, timeout: float | None) -> None:
        if not self._can_write.is_set():
            try:
                await asyncio.wait_for(self._can_write.wait(), timeout)
            except TimeoutError:
                raise httpx.WriteTimeout("timed out sending the request") from None
        if self.closed:
            raise httpx.WriteError("connection closed while sending the request")

    async def _write_large(self, head: bytes, body: bytes, timeout: float | None) -> None:
        assert self.transport is not None
        self.transport.write(head)
        view = memoryview(body)
        for start in range(0, len(view), WRITE_CHUNK):
            await self._writable(timeout)
            self.transport.write(view[start : start + WRITE_CHUNK])

    # -- parsing ----------------------------------------------------------------------------------

    def _parse(self) -> None:
        buf = self._buf
        while True:
            if self._phase == 0:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise _ProtocolError("response head too long")
                    return
                head = bytes(buf[:end])
                del buf[: end + 4]
                if self._head(head):
                    continue  # an interim 1xx answer: the real one follows
            elif self._phase == 1:
                if self._mode == "length":
                    take = min(self._remaining, len(buf))
                    self._add_body(buf, take)
                    self._remaining -= take
                    if self._remaining == 0:
                        self._complete()
                    return
                self._add_body(buf, len(buf))  # read to close
                return
            elif self._phase == 2:  # chunk size line
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 4096:
                        raise _ProtocolError("chunk size line too long")
                    return
                line = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    raise _ProtocolError(f"bad chunk size {line[:20]!r}") from None
                if size < 0:
                    raise _ProtocolError("bad chunk size")
                self._remaining = size
                self._phase = 3 if size else 5
            elif self._phase == 3:  # chunk data
                take = min(self._remaining, len(buf))
                self._add_body(buf, take)
                self._remaining -= take
                if self._remaining:
                    return
                self._phase = 4
            elif self._phase == 4:  # CRLF after chunk data
                if len(buf) < 2:
                    return
                if buf[:2] != b"\r\n":
                    raise _ProtocolError("missing CRLF after chunk")
                del buf[:2]
                self._phase = 2
            elif self._phase == 5:  # trailer lines up to an empty one
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD:
                        raise _ProtocolError("trailers too long")
                    return
                del buf[: end + 2]
                if end == 0:
                    self._complete()
                    return
            else:
                return

    def _add_body(self, buf: bytearray, n: int) -> None:
        if n <= 0:
            return
        if len(self._body) + n > MAX_BODY:
            raise _ProtocolError(f"response body larger than {MAX_BODY} bytes")
        self._body += buf[:n]
        del buf[:n]

    def _head(self, head: bytes) -> bool:
        """Read the status line and headers; True if it was an interim (1xx) answer."""
        lines = head.split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
            raise _ProtocolError(f"not an HTTP/1.x status line: {lines[0][:60]!r}")
        try:
            status = int(parts[1])
        except ValueError:
            raise _ProtocolError(f"bad status code {parts[1][:10]!r}") from None
        if not 100 <= status <= 999:
            raise _ProtocolError(f"bad status code {status}")
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            if not line:
                continue
            if line[:1] in (b" ", b"\t") and headers:  # obsolete folding
                name, value = headers[-1]
                headers[-1] = (name, value + b" " + line.strip())
                continue
            name, sep, value = line.partition(b":")
            if not sep or not name.strip():
                raise _ProtocolError(f"bad header line {line[:60]!r}")
            headers.append((name.strip(), value.strip()))
        if 100 <= status < 200:
            return True
        self._version, self._status = parts[0], status
        self._reason = parts[2] if len(parts) > 2 else b""
        self._headers = headers
        connection = b",".join(v.lower() for k, v in headers if k.lower() == b"connection")
        if self._version == b"HTTP/1.1":
            self.keep_alive = b"close" not in connection
        else:
            self.keep_alive = b"keep-alive" in connection
        encodings = b",".join(v.lower() for k, v in headers if k.lower() == b"transfer-encoding")
        lengths = {v for k, v in headers if k.lower() == b"content-length"}
        if self._method == b"HEAD" or status in (204, 304):
            self._mode, self._remaining = "length", 0
        elif encodings:
            if encodings.rsplit(b",", 1)[-1].strip() != b"chunked":
                self._mode, self.keep_alive = "close", False
            else:
                self._mode = "chunked"
        elif lengths:
            if len(lengths) > 1:
                raise _ProtocolError("conflicting Content-Length headers")
            try:
                self._remaining = int(lengths.pop())
            except ValueError:
                raise _ProtocolError("bad Content-Length") from None
            if self._remaining < 0:
                raise _ProtocolError("bad Content-Length")
            if self._remaining > MAX_BODY:
                raise _ProtocolError(f"response body larger than {MAX_BODY} bytes")
            self._mode = "length"
        else:
            self._mode, self.keep_alive = "close", False
        if self._mode == "chunked":
            self._phase = 2
        else:
            self._phase = 1
            if self._mode == "length" and self._remaining == 0:
                self._complete()
        return False

    def _complete(self) -> None:
        self._phase = 6
        if self._buf:  # more than the answer: the connection is out of step
            self.keep_alive = False
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        response = httpx.Response(
            self._status,
            headers=self._headers,
            stream=httpx.ByteStream(bytes(self._body)),
            extensions={"http_version": self._version, "reason_phrase": self._reason},
        )
        self._body = bytearray()
        waiter.set_result(response)

    def _fail(self, exc: Exception) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self._close()

    def peer_spoke(self) -> bool:
        """True if the socket of this idle connection is readable: the server closed it (or sent
        what nobody asked for) and the event loop has not run since to tell us. One poll, as
        httpcore does before reusing a connection; a request on it would fail unanswered."""
        sock = self.transport.get_extra_info("socket") if self.transport is not None else None
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()


class Http11Transport(httpx.AsyncBaseTransport):
    """Up to `connections` connections in all (per origin, idle ones kept for reuse)."""

    def __init__(
        self,
        connections: int = 8,
        *,
        ssl_context: ssl.SSLContext | None = None,
        keepalive_expiry: float = KEEPALIVE_EXPIRY,
    ) -> None:
        self._slots = asyncio.Semaphore(max(1, connections))
        self._ssl_context = ssl_context
        self._keepalive_expiry = keepalive_expiry
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._closed = False

    def _ssl(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("transport is closed")
        url = request.url
        scheme = url.scheme
        if scheme not in ("http", "https"):
            raise httpx.UnsupportedProtocol(f"unsupported URL scheme {scheme!r}")
        host = url.host
        port = url.port or (443 if scheme == "https" else 80)
        timeouts: dict[str, Any] = request.extensions.get("timeout") or {}
        body: bytes | StreamBody
        declared = request.headers.get("content-length")
        if declared is not None and not isinstance(request.stream, httpx.ByteStream):
            # a streamed body of known length goes out as it is produced, never whole
            body = StreamBody(request.stream, int(declared))  # type: ignore[arg-type]
            head = _request_head(request, body.length)
        else:
            body = await request.aread()
            head = _request_head(request, len(body))
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), timeouts.get("pool"))
            except TimeoutError:
                raise httpx.PoolTimeout("no free connection within the pool timeout") from None
        else:
            await self._slots.acquire()
        try:
            key = (scheme, host, port)
            conn = self._take_idle(key)
            if conn is None:
                conn = await self._connect(scheme, host, port, timeouts.get("connect"))
            response = await conn.exchange(request.method.encode(), head, body, timeouts)
            wants_close = b"close" in request.headers.get("connection", "").lower().encode()
            if conn.keep_alive and not wants_close and not conn.closed and not self._closed:
                conn.idle_since = time.monotonic()
                self._idle.setdefault(key, []).append(conn)
            else:
                conn._close()
            return response
        finally:
            self._slots.release()

    def _take_idle(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if (
                not conn.closed
                and now - conn.idle_since < self._keepalive_expiry
                and not conn.peer_spoke()
            ):
                return conn
            conn._close()
        return None

    async def _connect(
        self, scheme: str, host: str, port: int, timeout: float | None
    ) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = self._ssl() if scheme == "https" else None
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    _Connection, host, port, ssl=tls, server_hostname=host if tls else None
                ),
                timeout,
            )
        except TimeoutError:
            raise httpx.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            raise httpx.ConnectError(f"{host}:{port}: {exc}") from exc
        return conn

    async def aclose(self) -> None:
        self._closed = True
        for conns in self._idle.values():
            for conn in conns:
                conn._close()
        self._idle.clear()


def _request_head(request: httpx.Request, length: int) -> bytes:
    """Status line and headers. The body was read whole, so a streamed (chunked) request goes out
    with its Content-Length instead."""
    target = request.url.raw_path or b"/"
    lines: list[bytes] = [request.method.encode("ascii") + b" " + target + b" HTTP/1.1"]
    raw: Iterable[tuple[bytes, bytes]] = request.headers.raw
    chunked = False
    for name, value in raw:
        if name.lower() == b"transfer-encoding":
            chunked = True
            continue
        lines.append(name + b": " + value)
    if chunked:
        lines.append(b"Content-Length: " + str(length).encode("ascii"))
    return b"\r\n".join(lines) + b"\r\n\r\n"


def make_client(*, timeout: float, concurrency: int, **kwargs: Any) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` for a backend making up to `concurrency` calls at once."""
    return httpx.AsyncClient(timeout=timeout, transport=Http11Transport(concurrency), **kwargs)
