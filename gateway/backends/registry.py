"""The table from a config's `type = "..."` to its config model and backend class.

Looked up once at start-up (and by `gateway check`): an unknown type stops the config load, not
the first mail. The config models are in gateway.backends.config; a backend's module (and its
HTTP/SOAP stack) is imported only when a backend is built, so that `gateway deliver` and the
intake process stay light.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.backends import config as backend_config
from gateway.backends.base import Backend
from gateway.backends.config import BackendConfigBase

if TYPE_CHECKING:  # httpx is imported only when a backend is built
    from gateway.backends.http import ResponseBudget

# type -> (module, config model, backend class)
BACKEND_TYPES: dict[str, tuple[str, str, str]] = {
    "superoffice-soap": (
        "gateway.backends.superoffice_soap",
        "SuperOfficeSoapConfig",
        "SuperOfficeSoapBackend",
    ),
    "superoffice-rest": (
        "gateway.backends.superoffice_rest",
        "SuperOfficeRestConfig",
        "SuperOfficeRestBackend",
    ),
    "interserver": ("gateway.backends.interserver", "InterServerConfig", "InterServerBackend"),
    "whmcs": ("gateway.backends.whmcs", "WhmcsConfig", "WhmcsBackend"),
}


def config_model(type_name: str) -> type[BackendConfigBase]:
    """The config model of a type: from gateway.backends.config, without the backend's module."""
    _, model, _ = BACKEND_TYPES[type_name]
    cls: type[BackendConfigBase] = getattr(backend_config, model)
    return cls


def make_backend(
    name: str, cfg: BackendConfigBase, *, base_dir: Path, budget: ResponseBudget | None = None
) -> Backend:
    """Build the backend of `cfg.type`; `budget` is the process's shared `ResponseBudget`."""
    module, _, cls_name = BACKEND_TYPES[cfg.type]
    cls: Any = getattr(importlib.import_module(module), cls_name)
    backend: Backend = cls(name, cfg, base_dir=base_dir, budget=budget)
    return backend
