"""`gateway simulate`: one aiohttp server for the four systems and `/_sim`, plus the SMTP sink.

Paths (DESIGN): SuperOffice customer SOAP `/superoffice/soap/customer`, SuperOffice WebAPI
`/superoffice/api/v1/...`, InterServer `/interserver/api.php`, WHMCS `/whmcs/includes/api.php`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from aiohttp import web

from gateway.simulators import interserver, sink, superoffice_rest, superoffice_soap, whmcs
from gateway.simulators.state import LATE_REPLY, SYSTEMS, SimState, SimTicket, parse_fault

log = logging.getLogger("gateway.simulators")

SYSTEM_MODULES = (superoffice_soap, superoffice_rest, interserver, whmcs)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, ensure_ascii=False))


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(text=f"body is not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="body must be a JSON object")
    return data


@web.middleware
async def _late_reply(request: web.Request, handler: Any) -> web.StreamResponse:
    """A `slow` fault with `late_reply`: the call has taken effect, its answer comes late."""
    response: web.StreamResponse = await handler(request)
    delay = request.get(LATE_REPLY)
    if delay:
        await asyncio.sleep(float(delay))
    return response


def build_app(state: SimState) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024, middlewares=[_late_reply])

    async def list_tickets(request: web.Request) -> web.Response:
        system = request.query.get("system")
        return _json([t.to_json() for t in state.tickets if not system or t.system == system])

    async def create_ticket(request: web.Request) -> web.Response:
        body = await _body(request)
        system = body.get("system")
        if system not in SYSTEMS:
            raise web.HTTPBadRequest(text=f"system must be one of {', '.join(SYSTEMS)}")
        if body.get("id"):
            tid = str(body["id"])
        elif system == interserver.SYSTEM:  # Kayako names its tickets by masks
            tid = interserver.new_mask(lambda m: state.find(system, m) is not None)
        else:
            tid = str(state.next_id(system))
        if state.find(system, tid) is not None:
            raise web.HTTPConflict(text=f"{system} ticket {tid} exists")
        ref = str(body.get("ref") or tid)
        ticket = SimTicket(
            system=system,
            id=tid,
            ref=ref,
            title=str(body.get("title", "")),
            requester=str(body.get("requester", "")),
            status=str(body.get("status", "open")),
            fields=dict(body.get("fields") or {}),
        )
        state.add_ticket(ticket)
        return _json(ticket.to_json(), status=201)

    async def close_ticket(request: web.Request) -> web.Response:
        """Close a ticket; WHMCS also takes {"status": "Resolved"}: a custom closed status."""
        system = request.match_info["system"]
        t = state.find(system, request.match_info["id"])
        if t is None:
            raise web.HTTPNotFound(text="no such ticket")
        status = "closed"
        if request.can_read_body and (await request.read()).strip():
            custom = str((await _body(request)).get("status") or "").strip()
            if custom and system != whmcs.SYSTEM:
                raise web.HTTPBadRequest(text="only whmcs has custom statuses")
            if custom and custom.lower() != "closed":
                status = custom
        t.status = status
        return _json(t.to_json())

    async def add_client(request: web.Request) -> web.Response:
        body = await _body(request)
        if body.get("system") not in SYSTEMS or not body.get("email"):
            raise web.HTTPBadRequest(text="system and email are required")
        client = {
            "system": body["system"],
            "email": str(body["email"]),
            "id": str(body.get("id") or state.next_id(body["system"])),
            "name": str(body.get("name", "")),
        }
        state.clients.append(client)
        return _json(client, status=201)

    async def outbox(request: web.Request) -> web.Response:
        return _json([r.record() if hasattr(r, "record") else r for r in state.outbox])

    async def autoreply(request: web.Request) -> web.Response:
        body = await _body(request)
        mode = body.get("mode", "off")
        if mode not in ("off", "rfc3834", "precedence", "bare"):
            raise web.HTTPBadRequest(text="mode must be off, rfc3834, precedence or bare")
        state.autoreply = {"mode": mode, "smtp": str(body.get("smtp", "127.0.0.1:2525"))}
        return _json(state.autoreply)

    async def fault(request: web.Request) -> web.Response:
        body = await _body(request)
        try:
            system, f = parse_fault(body)
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from exc
        targets = SYSTEMS if system == "*" else (system,)
        for s in targets:
            if f is None:
                state.faults.pop(s, None)
            else:
                state.faults[s] = f
        if f is None and system == "*":
            state.faults.clear()
        return _json({"system": system, "mode": body.get("mode")})

    async def reset(request: web.Request) -> web.Response:
        state.reset()
        return _json({"reset": True})

    async def expire_sessions(request: web.Request) -> web.Response:
        state.session_epoch += 1
        return _json({"session_epoch": state.session_epoch})

    async def calls(request: web.Request) -> web.Response:
        return _json(state.calls)

    async def inflight(request: web.Request) -> web.Response:
        return _json(
            {s: {"now": state.inflight[s], "max": state.max_inflight[s]} for s in state.inflight}
        )

    app.router.add_get("/_sim/tickets", list_tickets)
    app.router.add_post("/_sim/tickets", create_ticket)
    app.router.add_post("/_sim/tickets/{system}/{id}/close", close_ticket)
    app.router.add_post("/_sim/clients", add_client)
    app.router.add_get("/_sim/outbox", outbox)
    app.router.add_post("/_sim/autoreply", autoreply)
    app.router.add_post("/_sim/fault", fault)
    app.router.add_post("/_sim/reset", reset)
    app.router.add_post("/_sim/sessions/expire", expire_sessions)
    app.router.add_get("/_sim/calls", calls)
    app.router.add_get("/_sim/inflight", inflight)
    for module in SYSTEM_MODULES:
        module.add_routes(app, state)
    return app


def _split(hostport: str) -> tuple[str, int]:
    host, _, port = hostport.rpartition(":")
    return host or "127.0.0.1", int(port)


class Simulators:
    """Start/stop the HTTP simulators and the SMTP sink inside a running event loop."""

    def __init__(self, listen: str = "127.0.0.1:8900", smtp: str = "127.0.0.1:2526") -> None:
        self.state = SimState()
        self.http_host, self.http_port = _split(listen)
        self.smtp_host, self.smtp_port = _split(smtp)
        self._runner: web.AppRunner | None = None
        self.sink: sink.SmtpSink | None = None

    async def start(self) -> None:
        self._runner = web.AppRunner(build_app(self.state), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.http_host, self.http_port)
        await site.start()
        if self.http_port == 0:  # tests bind port 0: read back the real one
            server = site._server
            assert server is not None
            self.http_port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        self.sink = sink.SmtpSink(self.state, self.smtp_host, self.smtp_port)
        await self.sink.start()
        self.smtp_port = self.sink.port

    @property
    def base_url(self) -> str:
        return f"http://{self.http_host}:{self.http_port}"

    async def stop(self) -> None:
        if self.sink is not None:
            await self.sink.stop()
        if self._runner is not None:
            await self._runner.cleanup()


async def serve_forever(listen: str, smtp: str) -> None:
    sims = Simulators(listen, smtp)
    await sims.start()
    log.info(
        "simulate_ready",
        extra={"fields": {"http": sims.base_url, "smtp": f"{sims.smtp_host}:{sims.smtp_port}"}},
    )
    print(
        f"simulators on {sims.base_url}, SMTP sink on {sims.smtp_host}:{sims.smtp_port}", flush=True
    )
    try:
        await asyncio.Event().wait()
    finally:
        await sims.stop()
