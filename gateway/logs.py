"""Logging set-up: one event per line, key=value (default) or JSON, journald-friendly levels.

Under systemd (JOURNAL_STREAM set) lines carry a `<N>` syslog priority prefix so journald keeps
the level; elsewhere a timestamp leads. Messages are already `event=... key=value` strings.

With `[gateway] log_file` the lines go to that file instead (always with timestamps). The file is
reopened when it was moved or deleted (checked before each line, `WatchedFileHandler`) and on
SIGHUP (`reopen_logs`), so logrotate can simply rename it: no `copytruncate` (which loses lines).
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import sys
import time

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class KeyValueFormatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage().replace("\n", "\\n")
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{record.name} {msg}"
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{ts}Z level={record.levelname.lower()} logger={record.name} {msg}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        msg = record.getMessage()
        # event=... key=value pairs become JSON fields; values with spaces are repr-quoted
        for token in _split_kv(msg):
            k, sep, v = token.partition("=")
            if sep and k.isidentifier():
                fields[k] = v.strip("'\"")
        fields.setdefault("msg", msg)
        return json.dumps(fields, ensure_ascii=False)


def _split_kv(msg: str) -> list[str]:
    out, cur, quote = [], [], ""
    for ch in msg:
        if quote:
            cur.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            cur.append(ch)
        elif ch == " ":
            if cur:
                out.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if cur:
        out.append("".join(cur))
    return out


class ReopeningFileHandler(logging.handlers.WatchedFileHandler):
    """A log file that follows logrotate's rename, and reopens on demand (SIGHUP)."""

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.flush()
                self.stream.close()
            self.stream = self._open()  # the file at the path now (created if it was removed)
            self._statstream()
        finally:
            self.release()


def setup_logging(
    level: str = "info", fmt: str = "kv", log_file: os.PathLike[str] | None = None
) -> None:
    """Send the root logger to stderr, or to `log_file`; raises OSError when it cannot be opened
    (the old handlers then stay in place)."""
    handler: logging.Handler
    if log_file is not None:
        handler = ReopeningFileHandler(os.fspath(log_file), encoding="utf-8")
        journald = False
    else:
        handler = logging.StreamHandler(sys.stderr)
        journald = bool(os.environ.get("JOURNAL_STREAM"))
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter(journald))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        if isinstance(h, logging.FileHandler):
            h.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in (
        "aiosmtpd",
        "mail",
        "httpx",
        "httpcore",
        "zeep",
        "aiohttp.access",
        "asyncio",
        "mailparser",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def reopen_logs() -> None:
    """Reopen the log file (SIGHUP): after logrotate moved it, lines go to the new file."""
    for h in logging.getLogger().handlers:
        if isinstance(h, ReopeningFileHandler):
            h.reopen()
