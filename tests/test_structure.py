"""The module structure is checked, not hoped for (STYLE 13): data flows one way and stages never
import each other; only the worker composes them and only app/cli read the config."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "gateway"

# stage -> modules it must never import (prefix match on the dotted name)
FORBIDDEN = {
    "gateway.intake": (
        "gateway.backends",
        "gateway.worker",
        "gateway.rules",
        "gateway.mail",
        "gateway.classify",
        "gateway.ack",
        "gateway.app",
        "gateway.config",
    ),
    "gateway.backends": (
        "gateway.intake",
        "gateway.worker",
        "gateway.rules",
        "gateway.classify",
        "gateway.spool",
        "gateway.app",
        "gateway.config",
        "gateway.simulators",
    ),
    "gateway.rules": (
        "gateway.backends",
        "gateway.intake",
        "gateway.spool",
        "gateway.worker",
        "gateway.app",
        "gateway.config",
        "gateway.mail",
        "gateway.classify",
    ),
    "gateway.mail": (
        "gateway.backends",
        "gateway.intake",
        "gateway.spool",
        "gateway.worker",
        "gateway.rules",
        "gateway.app",
        "gateway.config",
        "gateway.classify",
    ),
    "gateway.classify": (
        "gateway.backends",
        "gateway.intake",
        "gateway.spool",
        "gateway.worker",
        "gateway.rules",
        "gateway.app",
        "gateway.config",
        "gateway.mail",
    ),
    "gateway.spool": (
        "gateway.backends",
        "gateway.intake",
        "gateway.worker",
        "gateway.rules",
        "gateway.mail",
        "gateway.classify",
        "gateway.app",
        "gateway.config",
    ),
    "gateway.simulators": (
        "gateway.intake",
        "gateway.worker",
        "gateway.rules",
        "gateway.spool",
        "gateway.app",
        "gateway.config",
        "gateway.mail",
        "gateway.classify",
    ),
    # the acknowledgement policy is pure: `gateway route` and the worker decide alike
    "gateway.ackpolicy": (
        "gateway.backends",
        "gateway.intake",
        "gateway.spool",
        "gateway.worker",
        "gateway.rules",
        "gateway.app",
        "gateway.config",
        "gateway.mail",
        "gateway.classify",
        "gateway.ack",
    ),
    # the own DKIM check: the mail's bytes and DNS in, a DkimResult out
    "gateway.dkimcheck": (
        "gateway.backends",
        "gateway.intake",
        "gateway.spool",
        "gateway.worker",
        "gateway.rules",
        "gateway.app",
        "gateway.config",
        "gateway.mail",
        "gateway.classify",
    ),
    "gateway.worker": ("gateway.intake", "gateway.app", "gateway.config", "gateway.simulators"),
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


MODULES = sorted(PKG.rglob("*.py"))


def test_every_module_opens_with_a_docstring() -> None:
    missing = [str(p) for p in MODULES if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_stages_do_not_import_each_other(path: Path) -> None:
    name = module_name(path)
    for stage, forbidden in FORBIDDEN.items():
        if name == stage or name.startswith(stage + "."):
            bad = sorted(
                i for i in imports_of(path) for f in forbidden if i == f or i.startswith(f + ".")
            )
            assert bad == [], f"{name} imports {bad}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_only_the_spool_package_names_an_engine(path: Path) -> None:
    """Everything goes through the `Spool` protocol; `gateway.spool.open_spool` picks the engine."""
    name = module_name(path)
    if name == "gateway.spool" or name.startswith("gateway.spool."):
        return
    engines = ("gateway.spool.sqlite", "gateway.spool.postgres", "sqlite3", "psycopg")
    bad = sorted(i for i in imports_of(path) for e in engines if i == e or i.startswith(e + "."))
    assert bad == [], f"{name} imports {bad}"
