"""HTTP for every backend: httpx's own transport set up from the backend's config, response size
bounds, and the one mapping of HTTP outcomes into the error tree.

The client is `httpx.AsyncClient` over `httpx.AsyncHTTPTransport` (httpcore): connection limits
(`concurrency`), timeouts (`timeout`, per connect / read / write / pool wait, as httpx means them:
a read timeout is the longest pause between two reads), no retries of its own (the worker decides
when to try again) and no redirects. The only addition is `BoundedTransport`, a wrapper through
httpx's documented transport interface that stops reading an answer once it passes the backend's
`max_response_bytes`, or once all answers being read in this process hold more than the shared
`ResponseBudget`: a hostile or broken endpoint (an endless chunked body) costs a bounded amount of
memory, and the call fails as `TransientError`.

One mapping for every backend (`status_error`, `transport_error`); a backend handles first only
what its own system says in a status (a WebAPI entity call's 404 is "no such entity"):

    HTTP answer / transport failure            error                    why
    ----------------------------------------  -----------------------  ----------------------------
    401, 403, 407                              BackendUnavailable       credentials, IP or rights
    404, 405, 410                              BackendUnavailable       no API at the configured url
    1xx, 3xx (redirects are not followed)      BackendUnavailable       the url points elsewhere
    408, 425, 429, 5xx                         TransientError           busy or down; Retry-After
                                                                        (seconds or HTTP date) kept
    any other 4xx (400, 409, 413, 422, ...)    PermanentError           this request is refused
    timeout (connect, read, write, pool)       TransientError
    connection refused/reset, protocol error   TransientError
    answer past max_response_bytes or budget   TransientError           (ResponseTooLarge)
    url not http(s), invalid url               BackendUnavailable       config
"""

from __future__ import annotations

import email.utils
import functools
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC
from typing import Any

import httpx

from gateway.errors import BackendError, BackendUnavailable, PermanentError, TransientError

DEFAULT_MAX_RESPONSE = 16 * 1024 * 1024  # bytes of one answer (a backend's answers are small)
DEFAULT_IN_FLIGHT = 64 * 1024 * 1024  # bytes all answers being read may hold at once
KEEPALIVE_EXPIRY = 5.0  # seconds an idle connection is kept for reuse

TRANSIENT_STATUSES = frozenset({408, 425, 429})
CREDENTIAL_STATUSES = frozenset({401, 403, 407})
NO_API_STATUSES = frozenset({404, 405, 410})


class ResponseTooLarge(httpx.TransportError):
    """An answer passed `max_response_bytes`, or all answers in flight passed the budget."""


class ResponseBudget:
    """Bytes that all backend answers being read in one process may hold at once.

    One per worker process, shared by every backend (`make_client(budget=...)`). Everything runs
    on one event loop, so plain counting suffices.
    """

    def __init__(self, limit: int = DEFAULT_IN_FLIGHT) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held = max(0, self.held - n)


class _BoundedStream(httpx.AsyncByteStream):
    def __init__(
        self,
        inner: httpx.AsyncByteStream,
        request: httpx.Request,
        cap: int,
        budget: ResponseBudget,
    ) -> None:
        self._inner, self._request, self._cap, self._budget = inner, request, cap, budget
        self._seen = 0
        self._held = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._inner:
            self._seen += len(chunk)
            if self._seen > self._cap:
                raise ResponseTooLarge(
                    f"answer larger than {self._cap} bytes (max_response_bytes)",
                    request=self._request,
                )
            if not self._budget.take(len(chunk)):
                raise ResponseTooLarge(
                    f"answers in flight hold more than {self._budget.limit} bytes",
                    request=self._request,
                )
            self._held += len(chunk)
            yield chunk

    async def aclose(self) -> None:
        self._budget.give(self._held)
        self._held = 0
        await self._inner.aclose()


class BoundedTransport(httpx.AsyncBaseTransport):
    """httpx's `AsyncHTTPTransport` whose answers are read within `cap` and the shared budget."""

    def __init__(
        self, inner: httpx.AsyncBaseTransport, *, cap: int, budget: ResponseBudget
    ) -> None:
        self._inner, self._cap, self._budget = inner, cap, budget

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        try:
            response = await self._inner.handle_async_request(request)
        except httpx.HTTPError:
            raise
        except Exception as exc:  # httpcore lets h11's own errors through when a body is written
            raise httpx.LocalProtocolError(f"{type(exc).__name__}: {exc}", request=request) from exc
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._cap:
            await response.aclose()
            raise ResponseTooLarge(
                f"answer of {declared} bytes is larger than {self._cap} (max_response_bytes)",
                request=request,
            )
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(
            status_code=response.status_code,
            headers=response.headers,
            stream=_BoundedStream(response.stream, request, self._cap, self._budget),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._inner.aclose()


@functools.cache
def tls_context() -> ssl.SSLContext:
    """httpx's default TLS context (certificates checked against its CA bundle), made once per
    process and shared: loading the CA bundle costs more than everything else a client needs."""
    return httpx.create_ssl_context()


def make_client(
    *,
    timeout: float,
    concurrency: int,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE,
    budget: ResponseBudget | None = None,
    **kwargs: Any,
) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` for a backend making up to `concurrency` calls at once.

    `budget` is the process's shared `ResponseBudget`; without one the client gets its own.
    Other keyword arguments go to `httpx.AsyncClient` (headers, follow_redirects, ...).
    """
    inner = httpx.AsyncHTTPTransport(
        verify=tls_context(),
        limits=httpx.Limits(
            max_connections=concurrency,
            max_keepalive_connections=concurrency,
            keepalive_expiry=KEEPALIVE_EXPIRY,
        ),
        retries=0,
    )
    transport = BoundedTransport(
        inner, cap=max_response_bytes, budget=budget if budget is not None else ResponseBudget()
    )
    kwargs.setdefault("follow_redirects", False)
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout), transport=transport, **kwargs)


def retry_after(value: str | None) -> float | None:
    """Seconds to wait from a `Retry-After` header (delta-seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # "-0000": UTC by RFC 5322
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - time.time())


def status_error(where: str, status: int, headers: Mapping[str, str] | None = None) -> BackendError:
    """The error for an HTTP status that is not a success (see the table in the module docstring).

    `where` starts the message ("WHMCS OpenTicket"); a backend appends its system's own text.
    """
    text = f"{where}: HTTP {status}"
    if status in TRANSIENT_STATUSES or status >= 500:
        wait = retry_after(headers.get("retry-after") if headers is not None else None)
        return TransientError(text, retry_after=wait)
    if status in CREDENTIAL_STATUSES:
        return BackendUnavailable(f"{text}: access refused (credentials, IP or rights)")
    if status in NO_API_STATUSES:
        return BackendUnavailable(f"{text}: no API at the configured url (check the backend url)")
    if 400 <= status < 500:
        return PermanentError(f"{text}: request refused")
    return BackendUnavailable(f"{text}: unexpected answer (the url points elsewhere?)")


def transport_error(where: str, exc: Exception) -> BackendError:
    """The error for an exchange that got no complete answer (see the module docstring)."""
    if isinstance(exc, httpx.TimeoutException):
        return TransientError(
            f"{where}: timeout, no answer in time: timed out ({type(exc).__name__})"
        )
    if isinstance(exc, httpx.UnsupportedProtocol | httpx.InvalidURL):
        return BackendUnavailable(f"{where}: bad url: {exc}")
    if isinstance(exc, ResponseTooLarge):
        return TransientError(f"{where}: {exc}")
    if isinstance(exc, httpx.HTTPStatusError):
        return status_error(where, exc.response.status_code, exc.response.headers)
    return TransientError(f"{where}: connection failed ({type(exc).__name__}: {exc})")
