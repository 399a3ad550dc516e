"""Log lines: the event's name and its fields as the call site passed them (`extra=`), never
parsed out of text; the writing process named on every line; journald priorities kept."""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import logs


class Err:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys, self.text = capsys, ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def captured(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Iterator[tuple[Err, logging.Logger]]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    yield Err(capsys), logging.getLogger("gateway.test")
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def test_json_fields_are_the_ones_passed(
    captured: tuple[Err, logging.Logger],
) -> None:
    stream, log = captured
    logs.setup_logging("info", "json", role="worker")
    tricky = "it's a value with spaces, = and 'quotes'"
    log.info("deferred", extra={"fields": {"id": 7, "error": tricky, "ms": "13", "kind": "x"}})
    log.info("stored", extra={"fields": {"id": 3, "note": "a b", "ok": True, "s": 0.5}})
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert list(first)[5:] == ["event", "id", "error", "ms", "kind"]  # after ts..pid, in order
    assert first["event"] == "deferred" and first["id"] == 7 and first["error"] == tricky
    assert first["ms"] == "13" and first["kind"] == "x"
    assert first["role"] == "worker" and first["pid"] == os.getpid()
    assert second["event"] == "stored" and second["id"] == 3 and second["note"] == "a b"
    assert second["ok"] is True and second["s"] == 0.5


def test_text_is_never_parsed_for_fields(captured: tuple[Err, logging.Logger]) -> None:
    stream, log = captured
    logs.setup_logging("info", "json", role="worker")
    # a library's line that looks like key=value stays its text: no field is made up from it
    logging.getLogger("aioimaplib").warning("event=%s user=%s", "fake", "x y")
    log.info("event=old_style id=%d", 5)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "event=fake user=x y" and "event" not in first and "user" not in first
    assert second["msg"] == "event=old_style id=5" and "id" not in second


def test_every_event_of_ours_passes_its_fields() -> None:
    """No call site of gateway/ logs a template: each passes the event's name as the message
    and its fields as `extra={"fields": {...}}` (checked on the source)."""
    import ast
    from pathlib import Path

    levels = {"debug", "info", "warning", "error", "exception", "critical"}
    found, wrong = 0, []
    for path in sorted((Path(__file__).parent.parent / "gateway").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in levels
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "log"
            ):
                continue
            found += 1
            extra = next((k.value for k in node.keywords if k.arg == "extra"), None)
            ok = (
                len(node.args) == 1
                and not (isinstance(node.args[0], ast.Constant) and "=" in str(node.args[0].value))
                and isinstance(extra, ast.Dict)
                and [ast.literal_eval(k) for k in extra.keys if k is not None] == ["fields"]
            )
            if not ok:
                wrong.append(f"{path.name}:{node.lineno}")
    assert found > 100 and not wrong, wrong


def test_key_value_lines_name_the_process_and_quote_what_needs_it(
    captured: tuple[Err, logging.Logger],
) -> None:
    stream, log = captured
    logs.setup_logging("info", "kv", role="intake")
    log.warning("refused", extra={"fields": {"peer": "127.0.0.1", "reason": "too many"}})
    line = stream.getvalue().strip()
    assert f" role=intake pid={os.getpid()} " in line
    assert line.endswith("event=refused peer=127.0.0.1 reason='too many'")
    assert " level=warning logger=gateway.test " in line
    logs.setup_logging("info", "kv")  # a reload keeps the role
    log.info("again", extra={"fields": {}})
    assert "role=intake" in stream.getvalue().splitlines()[-1]


def test_journald_keeps_the_priority(
    captured: tuple[Err, logging.Logger], monkeypatch: pytest.MonkeyPatch
) -> None:
    stream, log = captured
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    logs.setup_logging("info", "kv", role="worker")
    log.error("boom", extra={"fields": {}})
    log.info("free text without fields")
    err, info = stream.getvalue().splitlines()
    assert err.startswith("<3>gateway.test role=worker pid=") and err.endswith(" event=boom")
    assert info.startswith("<6>") and info.endswith("free text without fields")


# -- docs/log-events.md names every event the gateway logs -----------------------------------------

ROOT = Path(__file__).resolve().parent.parent
# `log.info("event=NAME key=%s", ...)`, or `log.info("NAME", extra={"fields": {...}})`
_TEMPLATE_EVENT = re.compile(r"event=([a-z][a-z0-9_]*)")
_EXTRA_EVENT = re.compile(
    r"\b(?:log|logger)\.(?:debug|info|warning|error|exception|critical)\(\s*"
    r"\"([a-z][a-z0-9_]*)\"\s*,\s*extra="
)


def logged_events() -> dict[str, str]:
    """event -> the first module that logs it (the simulators have a log of their own)."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        if "simulators" in path.parts or path.name == "logs.py":  # logs.py: examples only
            continue
        text = path.read_text()
        for m in (*_TEMPLATE_EVENT.finditer(text), *_EXTRA_EVENT.finditer(text)):
            found.setdefault(m.group(1), str(path.relative_to(ROOT)))
    return found


def test_every_logged_event_is_documented() -> None:
    doc = (ROOT / "docs/log-events.md").read_text()
    events = logged_events()
    assert {"outcome", "accepted", "ack_skipped"} <= set(events)  # the scan finds them at all
    missing = {e: where for e, where in events.items() if f"`{e}`" not in doc}
    assert missing == {}, "log events missing from docs/log-events.md"
    # the two events whose name is an argument (app.py: "event=%s")
    assert "`ready` / `worker_ready`" in doc


def test_the_doc_names_the_fields_every_line_carries() -> None:
    doc = (ROOT / "docs/log-events.md").read_text()
    for field in ("`level`", "`logger`", "`role`", "`pid`", "`event`"):
        assert field in doc
    assert "role=worker pid=" in doc
