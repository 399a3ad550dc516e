"""The HTTP client every backend uses: several small connection pools instead of one big one.

httpcore's pool checks every idle connection (a getpeername and a poll each) and walks every
waiting request each time it hands out a connection, so one pool of 32 connections costs the
worker more CPU per call than the call itself. Requests are spread round-robin over pools of at
most `PER_SHARD` connections; together they hold as many connections as `concurrency` asks.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import httpx

PER_SHARD = 4


class ShardedTransport(httpx.AsyncBaseTransport):
    def __init__(self, connections: int, *, per_shard: int = PER_SHARD) -> None:
        count = max(1, math.ceil(connections / per_shard))
        size = max(1, min(per_shard, connections))
        self._shards = [
            httpx.AsyncHTTPTransport(
                limits=httpx.Limits(max_connections=size, max_keepalive_connections=size)
            )
            for _ in range(count)
        ]
        self._next = itertools.cycle(range(count))

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._shards[next(self._next)].handle_async_request(request)

    async def aclose(self) -> None:
        for shard in self._shards:
            await shard.aclose()


def make_client(*, timeout: float, concurrency: int, **kwargs: Any) -> httpx.AsyncClient:
    """An `httpx.AsyncClient` for a backend making up to `concurrency` calls at once."""
    return httpx.AsyncClient(timeout=timeout, transport=ShardedTransport(concurrency), **kwargs)
