"""HTTP endpoints for monitoring: `GET /healthz` (per component, 503 when one is down) and
`GET /metrics` (Prometheus text). Bound to loopback by default; no content or addresses exposed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway import __version__
from gateway.metrics import Metrics
from gateway.status import StatusBoard

log = logging.getLogger("gateway.health")

SPOOL_TIMEOUT = 5.0  # seconds a health check waits for the spool before calling it down


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        status: StatusBoard,
        metrics: Metrics,
        *,
        queue_info: Callable[[], Awaitable[dict[str, Any]]],
        oldest_queued_max: float,
        backend_down_max: float,
        spool_info: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        node: str = "",
        engine: str = "",
        disk_free: Callable[[], int | None] | None = None,
        min_free: int = 0,
    ) -> None:
        self.host, self.port = host, port
        self.status = status
        self.metrics = metrics
        self.queue_info = queue_info
        self.spool_info = spool_info
        self.node = node
        self.engine = engine
        # refreshes the gauges that come from the spool before /metrics renders them
        self.before_scrape: Callable[[], Awaitable[None]] | None = None
        self.oldest_queued_max = oldest_queued_max
        self.backend_down_max = backend_down_max
        self.disk_free = disk_free  # bytes free where the spool lives; None when unknown
        self.min_free = min_free
        self._runner: web.AppRunner | None = None
        self.started = False  # set once every component (the worker's too) has reported

    async def report(self) -> tuple[int, dict[str, Any]]:
        now = time.time()
        problems: list[str] = []
        if not self.started:
            problems.append("starting: not every component has reported yet")
        components: dict[str, Any] = {}
        for name, comp in self.status.components.items():
            components[name] = comp.to_json()
            if comp.ok:
                continue
            # A backend is only "down" for health once it has failed for a while: one refused
            # call is retried; a paused backend (credentials refused) counts at once.
            if comp.kind == "backend" and not comp.detail.startswith("paused"):
                if now - comp.since < self.backend_down_max:
                    continue
            problems.append(f"{name}: {comp.detail}")
        spool: dict[str, Any] = {"engine": self.engine} if self.engine else {}
        try:
            queue = await asyncio.wait_for(self.queue_info(), SPOOL_TIMEOUT)
            if self.spool_info is not None:
                spool.update(await asyncio.wait_for(self.spool_info(), SPOOL_TIMEOUT))
            spool["ok"] = True
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"no answer within {SPOOL_TIMEOUT:.0f} s")
            queue = {}
            spool["ok"] = False
            problems.append(f"spool: cannot read: {str(exc) or type(exc).__name__}")
        oldest = queue.get("oldest_queued_age")
        if oldest is not None and oldest > self.oldest_queued_max:
            problems.append(
                f"queue: oldest waiting message is {int(oldest)} s old (threshold {int(self.oldest_queued_max)} s)"
            )
        disk: dict[str, Any] | None = None
        if self.disk_free is not None:
            try:
                free = self.disk_free()
            except OSError as exc:
                free = None
                problems.append(f"spool: cannot read the free space of its file system: {exc}")
            if free is not None:
                disk = {"free": free, "min_free": self.min_free}
                if free < self.min_free:
                    problems.append(
                        f"spool: {free // 2**20} MiB free on its file system, below [spool]"
                        f" min_free ({self.min_free // 2**20} MiB): mail will soon be refused"
                    )
        body: dict[str, Any] = {
            "status": "ok" if not problems else ("starting" if not self.started else "fail"),
            "version": __version__,
            "components": components,
            "queue": queue,
        }
        if self.node:
            body["node"] = self.node
        if self.engine:
            body["spool"] = spool
        if disk is not None:
            body["disk"] = disk
        if problems:
            body["problems"] = problems
        return (200 if not problems else 503), body

    async def _healthz(self, request: web.Request) -> web.Response:
        code, body = await self.report()
        return web.json_response(body, status=code, dumps=lambda d: json.dumps(d, sort_keys=True))

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.before_scrape is not None:
            try:
                await asyncio.wait_for(self.before_scrape(), SPOOL_TIMEOUT)
            except Exception as exc:  # the spool's gauges keep their last values
                log.warning("metrics_refresh_failed", extra={"fields": {"error": str(exc)}})
        data = self.metrics.render()
        return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if server is not None and self.port == 0:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("health_listening", extra={"fields": {"host": self.host, "port": self.port}})

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
