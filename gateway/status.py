"""Live status of each component (spool, intakes, backends, rules, outbox) for /healthz and STATUS=.

Components set their own state; health.py only reads. No message content or addresses here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Component:
    name: str
    kind: str  # spool | intake | backend | rules | outbox
    ok: bool = True
    detail: str = ""
    since: float = field(default_factory=time.time)  # when `ok` last changed
    extra: dict[str, Any] = field(default_factory=dict)

    def set_ok(self, detail: str = "") -> None:
        if not self.ok:
            self.since = time.time()
        self.ok = True
        self.detail = detail

    def set_down(self, reason: str) -> None:
        if self.ok:
            self.since = time.time()
        self.ok = False
        self.detail = reason

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind,
            "status": "ok" if self.ok else "down",
            "since": round(self.since, 3),
        }
        if self.detail:
            d["detail"] = self.detail
        d.update(self.extra)
        return d


class StatusBoard:
    def __init__(self) -> None:
        self.components: dict[str, Component] = {}

    def register(self, name: str, kind: str) -> Component:
        comp = self.components.get(name)
        if comp is None:
            comp = Component(name=name, kind=kind)
            self.components[name] = comp
        return comp
