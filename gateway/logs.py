"""Logging set-up: one event per line, key=value (default) or JSON, journald-friendly levels.

Events are structured when they are logged, with logging's own means:
`log.info("event=stored id=%d size=%d", msg_id, size)` names its fields in the template and
passes the values as arguments, and `log.info("stored", extra={"fields": {"id": 1}})` passes them
as a mapping. Either way the formatters take the field names from the template (or the mapping)
and the values from the record's arguments: a value is never split out of rendered text, so one
with spaces, quotes or `=` in it stays one value. Every line also says which process wrote it:
`role` (intake | worker | all | cli) and `pid`.

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
import re
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

# one `key=%x` placeholder of a template (printf-style conversion, as logging uses)
_FIELD = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=(%[-#0 +]*\d*(?:\.\d+)?[sdirfgeExXc])")
_BARE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=([^\s%]+)")

_role = "cli"


def event_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields of one record: from `extra={"fields": {...}}`, else from its template's
    `key=%s` placeholders paired with its arguments (and literal `key=value` words of the
    template). Templates that do not fit this shape keep their rendered text as `msg`."""
    given = getattr(record, "fields", None)
    if isinstance(given, dict):
        fields: dict[str, Any] = {}
        if isinstance(record.msg, str) and "=" not in record.msg and " " not in record.msg:
            fields["event"] = record.msg
        fields.update(given)
        return fields
    template = record.msg if isinstance(record.msg, str) else str(record.msg)
    args = record.args if isinstance(record.args, tuple) else ()
    if template.count("%") - 2 * template.count("%%") != len(args):
        return {"msg": record.getMessage()}
    fields = {}
    values = iter(args)
    pos = 0
    for m in _FIELD.finditer(template):
        for bare in _BARE.finditer(template, pos, m.start()):
            fields[bare.group(1)] = bare.group(2)
        value = next(values)
        conv = m.group(2)
        if conv.endswith("r"):
            if not isinstance(value, str):  # a string stays itself: the formatter quotes it
                value = repr(value)
        elif conv[-1] in "di" and isinstance(value, int) and not isinstance(value, bool):
            pass  # a number stays a number (JSON)
        elif not conv.endswith("s"):
            try:
                value = conv % value
            except (TypeError, ValueError):
                pass
        fields[m.group(1)] = value
        pos = m.end()
    for bare in _BARE.finditer(template, pos):
        fields[bare.group(1)] = bare.group(2)
    if not fields:
        return {"msg": record.getMessage()}
    return fields


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
        fields = event_fields(record)
        if set(fields) == {"msg"}:
            body = str(fields["msg"])
        else:
            body = " ".join(f"{k}={_kv(v)}" for k, v in fields.items())
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
