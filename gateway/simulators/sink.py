"""PLACEHOLDER: the SMTP sink for acknowledgements (being written)."""

from __future__ import annotations

from gateway.simulators.state import SimState


class SmtpSink:
    def __init__(self, state: SimState, host: str, port: int) -> None:
        self.state, self.host, self.port = state, host, port

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
