"""PLACEHOLDER: being written (see the simulators task). Registers no routes yet."""

from aiohttp import web

from gateway.simulators.state import SimState


def add_routes(app: web.Application, state: SimState) -> None:
    """Register this system's routes on `app`."""
