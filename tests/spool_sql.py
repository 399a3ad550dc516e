"""Test helper: look into a SQLite spool's file with a connection of the test's own (the spool
itself offers only its `Spool` protocol)."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def sqlite_read(spool: Any, fn: Callable[[sqlite3.Connection], T]) -> T:
    path: Path = spool.path if hasattr(spool, "path") else spool._spool.path
    conn = sqlite3.connect(path, timeout=30.0)
    try:
        return fn(conn)
    finally:
        conn.close()
