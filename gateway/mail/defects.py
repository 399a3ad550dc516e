"""The list of what had to be repaired while parsing (`ParsedMail.defects`), ordered and capped."""

from __future__ import annotations

from gateway import mail as limits


class _Defects:
    """Ordered, de-duplicated, capped list of repair notes."""

    def __init__(self) -> None:
        self.items: list[str] = []
        self._seen: set[str] = set()
        self.dropped = 0

    def add(self, note: str) -> None:
        if note in self._seen:
            return
        if len(self.items) >= limits.MAX_DEFECTS:
            self.dropped += 1
            return
        self._seen.add(note)
        self.items.append(note)

    def result(self) -> tuple[str, ...]:
        if self.dropped:
            return (*self.items, f"{self.dropped} more defects not listed")
        return tuple(self.items)
