"""Dependencies are used through their public interfaces only (STYLE 14), checked on the source.

Fails when a module of gateway/
- imports a name (or a module path) starting with `_` from another package: a third-party one
  (`from aiosmtpd.smtp import _AuthMechAttr`, `import httpx._transports`), the standard library,
  or another package of ours (`gateway.worker` taking `gateway.mail._Part`; modules of one
  package, such as gateway/mail/, may share their `_` helpers);
- reads or writes an attribute starting with `_` that no code of ours defines: such a name can
  only belong to someone else's object (`reader._buffer`, `self._reader` inherited from aiosmtpd,
  `obj._call_handler_hook(...)`).
Dunder names (`__version__`, `__dict__`...) are the language's, not private; there is no
allow-list.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "gateway"
MODULES = sorted(PKG.rglob("*.py"))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of_path(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    return ".".join(rel.parts[:-1])


def _package_of_module(module: str) -> str:
    """The package a dotted module belongs to (itself when it is a package)."""
    if (PKG.parent / Path(*module.split("."))).is_dir():
        return module
    return module.rpartition(".")[0]


@functools.cache
def _own_private_names(paths: tuple[Path, ...] = tuple(MODULES)) -> frozenset[str]:
    """Every `_name` that gateway's own code defines: functions, classes, attributes it assigns
    (`self._x = ...`, `obj._x = ...`), class-level annotations and assignments, arguments."""
    names: set[str] = set()
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                names.add(node.name)
                if not isinstance(node, ast.ClassDef):
                    args = node.args
                    names.update(a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs])
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names.add(node.target.id)
    return frozenset(n for n in names if _private(n))


def _problems(path: Path, own: frozenset[str]) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out: list[str] = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(PKG.parent)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if any(_private(p) for p in alias.name.split(".")):
                    out.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: within our own package
                continue
            module = node.module or ""
            if any(_private(p) for p in module.split(".")):
                out.append(f"{where}: from {module} import ...")
                continue
            # a `_name` is private to its package: modules of one package may share it
            same_package = _package_of_module(module) == _package_of_path(path)
            for alias in node.names:
                if _private(alias.name) and not same_package:
                    out.append(f"{where}: from {module} import {alias.name}")
        elif isinstance(node, ast.Attribute) and _private(node.attr) and node.attr not in own:
            out.append(f"{where}: .{node.attr} (someone else's private attribute)")
    return out


def test_no_private_names_of_other_packages() -> None:
    own = _own_private_names()
    problems = [p for path in MODULES for p in _problems(path, own)]
    assert problems == [], "\n".join(problems)


def test_the_check_catches_what_it_is_for(tmp_path: Path) -> None:
    """The rule itself: a reach inside a dependency is found, our own private names are not."""
    sample = PKG / "_sample_for_test.py"
    sample.write_text(
        '"""x"""\n'
        "from aiosmtpd.smtp import _AuthMechAttr\n"
        "import httpx._transports\n"
        "from gateway.mail import _Part\n"
        "class Mine:\n"
        "    def __init__(self, reader):\n"
        "        self._mine = 1\n"
        "        reader._buffer.clear()\n"
        "        print(self._mine, self._reader)\n"
    )
    try:
        own = _own_private_names((*MODULES, sample)) - {"_buffer", "_reader"}
        found = _problems(sample, own)
    finally:
        sample.unlink()
    text = "\n".join(found)
    assert "_AuthMechAttr" in text
    assert "httpx._transports" in text
    assert "_Part" in text
    assert "._buffer" in text and "._reader" in text
    assert "._mine" not in text
