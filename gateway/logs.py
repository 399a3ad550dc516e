"""Logging set-up: one event per line, key=value (default) or JSON, journald-friendly levels.

Events are structured when they are logged, with logging's own means: the message is the
event's name and the fields go as a mapping,
`log.info("stored", extra={"fields": {"id": msg_id, "size": size}})`, rendered as
`event=stored id=7 size=20` (or the same keys in JSON). The formatters take names and values from
that mapping: nothing is parsed out of text, so a value with spaces, quotes or `=` in it stays one
value. Lines of other libraries keep their text (`msg`). Every line also says which process wrote
it: `role` (intake | worker | all | cli) and `pid`.

Under systemd (JOURNAL_STREAM set) lines carry a `<N>` syslog priority prefix so journald keeps
the level; elsewhere a timestamp leads.

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
from typing import Any

_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}

_role = "cli"


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields of one record, as its call site passed them: the message is the event's name
    and `extra={"fields": {...}}` its fields, in order. A record without fields (a library's
    line, a message of free text) keeps its rendered message as `msg`; nothing is parsed out of
    any text."""
    given = getattr(record, "fields", None)
    if not isinstance(given, dict):
        return {"msg": record.getMessage()}
    fields: dict[str, Any] = {}
    if isinstance(record.msg, str) and "=" not in record.msg and " " not in record.msg:
        fields["event"] = record.msg
    fields.update(given)
    return fields


def event_text(record: logging.LogRecord) -> str:
    """The record's fields as `key=value` words (the body of a key=value line), values quoted
    where they hold spaces, quotes or `=`; a record without fields gives its message."""
    fields = event_fields(record)
    if set(fields) == {"msg"}:
        return str(fields["msg"])
    return " ".join(f"{k}={_kv(v)}" for k, v in fields.items())


def _kv(value: Any) -> str:
    text = value if isinstance(value, str) else str(value)
    if text == "" or any(c in text for c in " \"'=\n\t"):
        return repr(text)
    return text


class KeyValueFormatter(logging.Formatter):
    def __init__(self, journald: bool) -> None:
        super().__init__()
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        body = event_text(record)
        if record.exc_info:
            body += " traceback=" + repr(self.formatException(record.exc_info))
        body = body.replace("\n", "\\n")
        who = f"role={_role} pid={record.process}"
        if self.journald:
            return f"<{_PRIORITY.get(record.levelno, 6)}>{record.name} {who} {body}"
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{ts}Z level={record.levelname.lower()} logger={record.name} {who} {body}"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "role": _role,
            "pid": record.process,
        }
        for key, value in event_fields(record).items():
            out.setdefault(key, value if isinstance(value, int | float | bool) else str(value))
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class ReopeningFileHandler(logging.handlers.WatchedFileHandler):
    """A log file that follows logrotate's rename (checked before each line) and is checked
    again on demand (SIGHUP), both through `WatchedFileHandler.reopenIfNeeded`."""

    def reopen(self) -> None:
        self.reopenIfNeeded()


def setup_logging(
    level: str = "info",
    fmt: str = "kv",
    log_file: os.PathLike[str] | None = None,
    *,
    role: str | None = None,
) -> None:
    """Send the root logger to stderr, or to `log_file`; raises OSError when it cannot be opened
    (the old handlers then stay in place). `role` names this process on every line; None keeps
    the one set before."""
    global _role
    handler: logging.Handler
    if log_file is not None:
        handler = ReopeningFileHandler(os.fspath(log_file), encoding="utf-8")
        journald = False
    else:
        handler = logging.StreamHandler(sys.stderr)
        journald = bool(os.environ.get("JOURNAL_STREAM"))
    if role is not None:
        _role = role
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
