"""Tests for gateway.tomlpos: TOML loading with line numbers and pydantic problems at file:line."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from gateway.errors import ConfigError
from gateway.tomlpos import LineMap, dotted, load_toml, loads_toml, pydantic_problems

SAMPLE = """\
# a comment
[gateway]
own_addresses = [
  "a@example.com",   # first
  "b@example.com",
]

[backends.whmcs]
type = "whmcs"
url = "http://127.0.0.1:8900/whmcs"
text = '''
[not.a.table]
x = 1
'''

[[rule]]
name = "first"
backend = "whmcs"

[[rule]]
name = "second"
[rule.match]
subject = { regex = "(?i)invoice" }
header."X-Priority" = "1*"
sender.domain = "x"   # dotted key

[rule.ticket]
deptid = 2
customfields = { 7 = "a", 8 = "b" }

[[rule]]
name = "third"
"""


def test_lines_of_tables_keys_and_array_of_tables() -> None:
    data, lines = loads_toml(SAMPLE)
    assert data["rule"][1]["match"]["header"]["X-Priority"] == "1*"
    assert lines.line_of(("gateway",)) == 2
    assert lines.line_of(("gateway", "own_addresses")) == 3
    assert lines.line_of(("gateway", "own_addresses", 1)) == 5
    assert lines.line_of(("backends",)) == 8
    assert lines.line_of(("backends", "whmcs")) == 8
    assert lines.line_of(("backends", "whmcs", "url")) == 10
    # a table header inside a multi-line string is not a header
    assert lines.line_of(("not",)) == 1
    assert lines.line_of(("rule", 0)) == 16
    assert lines.line_of(("rule", 0, "backend")) == 18
    assert lines.line_of(("rule", 1)) == 20
    assert lines.line_of(("rule", 1, "match")) == 22
    assert lines.line_of(("rule", 1, "match", "subject")) == 23
    assert lines.line_of(("rule", 1, "match", "subject", "regex")) == 23
    assert lines.line_of(("rule", 1, "match", "header", "X-Priority")) == 24
    assert lines.line_of(("rule", 1, "match", "sender", "domain")) == 25
    assert lines.line_of(("rule", 1, "ticket", "deptid")) == 28
    assert lines.line_of(("rule", 1, "ticket", "customfields", "8")) == 29
    assert lines.line_of(("rule", 2, "name")) == 32


def test_unknown_key_falls_back_to_nearest_enclosing_line() -> None:
    _, lines = loads_toml(SAMPLE)
    assert lines.line_of(("rule", 1, "match", "nonexistent", 4)) == 22
    assert lines.line_of(("rule", 1, "ticket", "x")) == 27
    assert lines.line_of(("nothing",)) == 1
    assert lines.line_of(()) == 1


def test_inline_array_of_tables_and_quoted_keys() -> None:
    text = 'rule = [\n  { name = "a" },\n  { name = "b", "odd key" = 1 },\n]\n'
    _, lines = loads_toml(text)
    assert lines.line_of(("rule", 0, "name")) == 2
    assert lines.line_of(("rule", 1, "odd key")) == 3


def test_nested_array_of_tables() -> None:
    text = "[[a]]\nx = 1\n[[a.b]]\ny = 1\n[[a.b]]\ny = 2\n[[a]]\n[[a.b]]\ny = 3\n"
    data, lines = loads_toml(text)
    assert data["a"][0]["b"][1]["y"] == 2
    assert lines.line_of(("a", 0, "b", 1, "y")) == 6
    assert lines.line_of(("a", 1, "b", 0, "y")) == 9


def test_syntax_error_carries_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("a = 1\n\n[x]\nb = \n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        load_toml(path)
    (problem,) = err.value.problems
    assert problem.file == str(path)
    assert problem.line == 4
    assert "TOML syntax" in problem.message and "at line" not in problem.message


def test_syntax_error_at_end_of_document() -> None:
    with pytest.raises(ConfigError) as err:
        loads_toml('a = 1\nb = "open', "f.toml")
    assert err.value.problems[0].line >= 1


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        load_toml(tmp_path / "missing.toml")
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'a = 1\nb = "\xe9"\n')
    with pytest.raises(ConfigError) as err:
        load_toml(path)
    assert err.value.problems[0].line == 2


class _Backend(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")
    type: str
    url: str
    timeout: float = 30.0
    port: int | str = 1


def test_pydantic_problems_point_at_the_key() -> None:
    text = '[backends.whmcs]\ntype = "whmcs"\ntimeout = "slow"\nbogus = 1\nport = [1]\n'
    data, lines = loads_toml(text)
    with pytest.raises(pydantic.ValidationError) as err:
        _Backend.model_validate(data["backends"]["whmcs"])
    problems = pydantic_problems(err.value, "c.toml", lines, ("backends", "whmcs"))
    by_text = {p.message.split(":")[0]: p for p in problems}
    assert by_text["backends.whmcs.timeout"].line == 3
    assert by_text["backends.whmcs.bogus"].line == 4
    assert by_text["backends.whmcs.bogus"].message.endswith("unknown key")
    assert by_text["backends.whmcs.url"].line == 1  # missing: the table's header
    assert "required" in by_text["backends.whmcs.url"].message
    # union member tags ("int", "str") are not shown as keys
    assert all(p.line == 5 for p in problems if p.message.startswith("backends.whmcs.port"))
    assert str(by_text["backends.whmcs.timeout"]).startswith("c.toml:3: backends.whmcs.timeout: ")


def test_dotted() -> None:
    assert dotted(("rule", 3, "match", "header", "X-Priority")) == "rule[3].match.header.X-Priority"
    assert dotted(("a", "b c")) == 'a."b c"'
    assert LineMap({("a",): 2}).line_of(("a", "b")) == 2
