"""Shared state of all simulators: tickets, clients, faults, the acknowledgement outbox.

Every simulated system keeps its tickets here so that `GET /_sim/tickets` shows them all in one
shape (DESIGN, "Simulators"). A system module asks `gate()` before serving a call; `gate` applies
`down` (the connection is dropped) and `slow` itself and returns the other modes ("error",
"reject", "auth") for the system to signal in its own way.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SYSTEMS = ("superoffice-soap", "superoffice-rest", "interserver", "whmcs")
ID_STARTS = {
    "superoffice-soap": 1001,
    "superoffice-rest": 2001,
    "interserver": 30001,
    "whmcs": 1001,
}

LATE_REPLY = "sim_late_reply"  # request key: seconds to hold the answer back (see Fault.late_reply)

# Demo credentials; config.example.toml uses the same ones.
ACCOUNT_EMAIL = "gateway@example.com"
PASSWORD = "demo-password"


@dataclass
class SimMessage:
    body: str
    author: str
    attachments: list[str] = field(default_factory=list)
    html: str = ""
    fields: dict[str, Any] = field(default_factory=dict)  # what the call carried besides text


@dataclass
class SimTicket:
    system: str
    id: str
    ref: str
    title: str
    requester: str
    fields: dict[str, Any] = field(default_factory=dict)
    messages: list[SimMessage] = field(default_factory=list)
    status: str = "open"
    created_at: float = field(default_factory=time.time)
    # what a system keeps besides the public view (InterServer's numeric Kayako id, the time of
    # the last activity...): never shown by /_sim/tickets
    internal: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "id": self.id,
            "ref": self.ref,
            "title": self.title,
            "requester": self.requester,
            "fields": copy.deepcopy(self.fields),
            "messages": [
                {
                    "body": m.body,
                    "author": m.author,
                    "attachments": list(m.attachments),
                    "html": m.html,
                    "fields": copy.deepcopy(m.fields),
                }
                for m in self.messages
            ],
            "status": self.status,
            "created_at": self.created_at,
        }


@dataclass
class Fault:
    mode: str  # down | error | reject | auth | slow
    latency_ms: int = 0
    count: int | None = None  # calls it applies to; None = until cleared / expired
    until: float | None = None  # monotonic deadline; None = no time limit
    late_reply: bool = False  # slow: the system acts at once, only its answer is late


class SimState:
    """Everything the simulators know. One instance per `gateway simulate` process."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.tickets: list[SimTicket] = []
        self._by_key: dict[tuple[str, str], SimTicket] = {}  # (system, id or ref) -> ticket
        self.clients: list[dict[str, Any]] = []  # {system, email, id, name}
        self.faults: dict[str, Fault] = {}
        self.outbox: list[Any] = []  # dicts, or the sink's StoredMail (parsed when read)
        self.calls: dict[str, int] = dict.fromkeys(SYSTEMS, 0)
        # calls in the fault gate (its latency) now, and the most at once since the reset:
        # what a cluster-wide concurrency limit is checked against
        self.inflight: dict[str, int] = dict.fromkeys(SYSTEMS, 0)
        self.max_inflight: dict[str, int] = dict.fromkeys(SYSTEMS, 0)
        self.session_epoch = 0  # bumped by /_sim/sessions/expire: every older session is invalid
        self.autoreply: dict[str, Any] = {"mode": "off", "smtp": ""}
        # Each system numbers its tickets in its own range, as separate installations would,
        # so that "[Ticket #<ref>]" of one system never names a ticket of another in the demo.
        self._ids = {s: itertools.count(start) for s, start in ID_STARTS.items()}

    def next_id(self, system: str) -> int:
        return next(self._ids[system])

    def add_ticket(self, ticket: SimTicket) -> SimTicket:
        self.tickets.append(ticket)
        self._by_key.setdefault((ticket.system, ticket.id), ticket)
        self._by_key.setdefault((ticket.system, ticket.ref), ticket)
        return ticket

    def find(self, system: str, ticket_id: str) -> SimTicket | None:
        key = str(ticket_id)
        t = self._by_key.get((system, key))
        if t is not None and (t.id == key or t.ref == key):
            return t
        for t in self.tickets:  # a ticket appended without add_ticket, or renumbered
            if t.system == system and (t.id == key or t.ref == key):
                return t
        return None

    def client_by_email(self, system: str, email: str) -> dict[str, Any] | None:
        for c in self.clients:
            if c["system"] == system and c["email"].lower() == email.lower():
                return c
        return None

    def _active_fault(self, system: str) -> Fault | None:
        f = self.faults.get(system) or self.faults.get("*")
        if f is None:
            return None
        if f.until is not None and time.monotonic() > f.until:
            self.faults.pop(system, None)
            return None
        if f.count is not None:
            if f.count <= 0:
                self.faults.pop(system, None)
                return None
            f.count -= 1
        return f

    async def gate(self, system: str, request: web.Request) -> str | None:
        """Apply the active fault for `system`; return "error"/"reject"/"auth" or None."""
        self.calls[system] = self.calls.get(system, 0) + 1
        f = self._active_fault(system)
        if f is None:
            return None
        if f.latency_ms and f.late_reply:
            request[LATE_REPLY] = f.latency_ms / 1000  # slept by the server after the call
        elif f.latency_ms:  # counted: how many calls the system had in flight at once
            now = self.inflight[system] = self.inflight.get(system, 0) + 1
            self.max_inflight[system] = max(self.max_inflight.get(system, 0), now)
            try:
                await asyncio.sleep(f.latency_ms / 1000)
            finally:
                self.inflight[system] -= 1
        if f.mode == "down":
            # As close to "connection refused" as one shared port allows: drop the connection
            # without an answer, so the client sees a connection error.
            if request.transport is not None:
                request.transport.abort()
            raise ConnectionAbortedError("simulated outage")
        if f.mode == "slow":
            return None
        return f.mode


def parse_fault(body: dict[str, Any]) -> tuple[str, Fault | None]:
    """Read a POST /_sim/fault body; returns (system or "*", fault or None for mode ok)."""
    system = str(body.get("system") or "*")
    if system != "*" and system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; one of {', '.join(SYSTEMS)}")
    mode = str(body.get("mode", ""))
    if mode not in ("down", "error", "reject", "auth", "slow", "ok"):
        raise ValueError(f"unknown mode {mode!r}")
    if mode == "ok":
        return system, None
    seconds = body.get("seconds")
    latency = int(body.get("latency_ms") or (1000 if mode == "slow" else 0))
    count = body.get("count")
    return system, Fault(
        mode=mode,
        latency_ms=latency,
        count=int(count) if count is not None else None,
        until=time.monotonic() + float(seconds) if seconds is not None else None,
        late_reply=bool(body.get("late_reply", False)),
    )
