"""TOML loading with line numbers, so that config and rule problems point at `file:line`.

`tomllib` parses but forgets where things were written. `load_toml` parses with `tomllib` (the
reference parser: it alone decides what is valid TOML) and then scans the same text once more with
a small lenient scanner that records, for every key path, the line where it is written:

    [backends.whmcs]          ("backends",) and ("backends", "whmcs")       -> this line
    url = "..."               ("backends", "whmcs", "url")                  -> this line
    [[rule]]                  ("rule", 0)   (index = how many [[rule]] came before)
    match = { subject = "x" } ("rule", 0, "match") and (..., "match", "subject")
    header."X-Priority" = "1" ("rule", 0, "match", "header", "X-Priority")
    recipient = ["a", "b"]    (..., "recipient", 0), (..., "recipient", 1): the element's line

`LineMap.line_of(loc)` answers the line of the longest recorded prefix of `loc`, i.e. the key
itself or else the nearest enclosing key or table header. `pydantic_problems` turns a
`pydantic.ValidationError` into `Problem`s with those lines.
"""

from __future__ import annotations

import bisect
import re
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pydantic

from gateway.errors import ConfigError, Problem

Loc = tuple[str | int, ...]

_TOML_LINE = re.compile(r"\(at line (\d+), column \d+\)")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
# Parts of a pydantic `loc` that name a union member or validator rather than a key.
_PYDANTIC_TAG = re.compile(r"[\[\]()',]|^(int|str|bool|float|bytes|none|constrained-\w+)$")


class LineMap:
    """Key path → line where it is written (1-based). See the module docstring for examples."""

    def __init__(self, lines: dict[Loc, int] | None = None) -> None:
        self._lines: dict[Loc, int] = dict(lines or {})

    def record(self, loc: Loc, line: int, *, overwrite: bool = True) -> None:
        if overwrite or loc not in self._lines:
            self._lines[loc] = line

    def line_of(self, loc: Sequence[str | int]) -> int:
        """Line of `loc`, else of its nearest recorded enclosing key or table; 1 if none."""
        key = tuple(loc)
        for end in range(len(key), 0, -1):
            line = self._lines.get(key[:end])
            if line is not None:
                return line
        return 1

    def __contains__(self, loc: object) -> bool:
        return loc in self._lines

    def __len__(self) -> int:
        return len(self._lines)


def load_toml(path: Path) -> tuple[dict[str, Any], LineMap]:
    """Parse a TOML file; raise `ConfigError` (one problem with the line) when it is not valid."""
    name = str(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError([Problem(name, 0, f"cannot read file: {exc.strerror or exc}")]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError([Problem(name, line, "not valid UTF-8")]) from exc
    return loads_toml(text, name)


def loads_toml(text: str, file: str = "<string>") -> tuple[dict[str, Any], LineMap]:
    """Like `load_toml` for text already in memory; `file` is used in problems."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = _TOML_LINE.search(message)
        if found:
            line = int(found.group(1))
            message = message[: found.start()].rstrip()
        else:  # "(at end of document)"
            line = text.count("\n") + (0 if text.endswith("\n") else 1)
            message = re.sub(r"\s*\(at end of document\)", "", message)
        raise ConfigError([Problem(file, max(line, 1), f"TOML syntax: {message}")]) from exc
    return data, _Scanner(text).scan()


def pydantic_problems(
    exc: pydantic.ValidationError, file: str, lines: LineMap, prefix: Loc = ()
) -> list[Problem]:
    """One `Problem` per validation error: `file:line: dotted.path: message`.

    `prefix` is where the validated object sits in the file (e.g. ("backends", "whmcs")).
    """
    problems: list[Problem] = []
    for err in exc.errors():
        loc = _clean_loc(prefix, tuple(err["loc"]), lines)
        message = _message(err)
        where = dotted(loc)
        problems.append(
            Problem(file, lines.line_of(loc), f"{where}: {message}" if where else message)
        )
    return problems


def dotted(loc: Iterable[str | int]) -> str:
    """("rule", 3, "match", "header", "X-Priority") → 'rule[3].match.header."X-Priority"'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            key = part if _BARE_KEY.fullmatch(part) and "-" not in part[:1] else f'"{part}"'
            out += f".{key}" if out else key
    return out


def _clean_loc(prefix: Loc, loc: Loc, lines: LineMap) -> Loc:
    """Drop the union-member/validator tags pydantic inserts into `loc` (they are not keys)."""
    out: list[str | int] = list(prefix)
    for part in loc:
        candidate = (*out, part)
        if isinstance(part, str) and candidate not in lines and _PYDANTIC_TAG.search(part):
            continue
        out.append(part)
    return tuple(out)


def _message(err: Any) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    msg = str(err.get("msg", "invalid value"))
    # "Value error, <ours>" is pydantic's wrapping of a ValueError raised by a validator.
    return msg.removeprefix("Value error, ")


class _Scanner:
    """Records key lines in text that tomllib has already accepted (so it can be lenient)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.map = LineMap()
        self._line_starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self._aot_counts: dict[Loc, int] = {}  # array-of-tables path → elements so far

    def line(self, pos: int | None = None) -> int:
        return bisect.bisect_right(self._line_starts, self.pos if pos is None else pos)

    # -- top level -------------------------------------------------------------------------
    def scan(self) -> LineMap:
        table: Loc = ()
        text = self.text
        while self.pos < len(text):
            self._skip_ws_comments_newlines()
            if self.pos >= len(text):
                break
            if text.startswith("[[", self.pos):
                line = self.line()
                self.pos += 2
                keys = self._key()
                self._expect("]]")
                table = self._resolve_header(keys, array=True)
                self._record_header(table, line)
            elif text[self.pos] == "[":
                line = self.line()
                self.pos += 1
                keys = self._key()
                self._expect("]")
                table = self._resolve_header(keys, array=False)
                self._record_header(table, line)
            else:
                self._keyval(table)
            self._skip_to_line_end()
        return self.map

    def _resolve_header(self, keys: list[str], *, array: bool) -> Loc:
        path: list[str | int] = []
        for i, key in enumerate(keys):
            path.append(key)
            last = i == len(keys) - 1
            here = tuple(path)
            if last and array:
                count = self._aot_counts.get(here, 0)
                self._aot_counts[here] = count + 1
                path.append(count)
            elif here in self._aot_counts:  # [a.b] inside the latest [[a]] element
                path.append(self._aot_counts[here] - 1)
        return tuple(path)

    def _record_header(self, table: Loc, line: int) -> None:
        self.map.record(table, line)
        for end in range(1, len(table)):
            self.map.record(table[:end], line, overwrite=False)

    # -- key = value -----------------------------------------------------------------------
    def _keyval(self, table: Loc) -> None:
        line = self.line()
        keys = self._key()
        path = (*table, *keys)
        for end in range(len(table) + 1, len(path)):
            self.map.record(path[:end], line, overwrite=False)
        self.map.record(path, line)
        self._skip_inline_ws()
        self._expect("=")
        self._skip_inline_ws()
        self._value(path)

    def _key(self) -> list[str]:
        keys: list[str] = []
        while True:
            self._skip_inline_ws()
            ch = self.text[self.pos : self.pos + 1]
            if ch == '"':
                keys.append(self._basic_string())
            elif ch == "'":
                keys.append(self._literal_string())
            else:
                m = _BARE_KEY.match(self.text, self.pos)
                if not m:  # cannot happen in valid TOML; stop rather than loop
                    return keys
                keys.append(m.group())
                self.pos = m.end()
            self._skip_inline_ws()
            if self.text.startswith(".", self.pos):
                self.pos += 1
                continue
            return keys

    def _value(self, path: Loc) -> None:
        text = self.text
        ch = text[self.pos : self.pos + 1]
        if text.startswith('"""', self.pos):
            end = text.find('"""', self.pos + 3)
            while end != -1 and _escaped(text, end):
                end = text.find('"""', end + 1)
            self.pos = len(text) if end == -1 else end + 3
            while text.startswith('"', self.pos):  # up to two quotes may close the string
                self.pos += 1
        elif text.startswith("'''", self.pos):
            end = text.find("'''", self.pos + 3)
            self.pos = len(text) if end == -1 else end + 3
            while text.startswith("'", self.pos):
                self.pos += 1
        elif ch == '"':
            self._basic_string()
        elif ch == "'":
            self._literal_string()
        elif ch == "[":
            self._array(path)
        elif ch == "{":
            self._inline_table(path)
        else:  # number, bool, date: runs to a delimiter
            m = re.compile(r"[^,\]}\n#]*").match(text, self.pos)
            self.pos = m.end() if m else self.pos + 1

    def _array(self, path: Loc) -> None:
        self.pos += 1  # [
        index = 0
        while self.pos < len(self.text):
            self._skip_ws_comments_newlines()
            if self.text.startswith("]", self.pos):
                self.pos += 1
                return
            self.map.record((*path, index), self.line())
            self._value((*path, index))
            index += 1
            self._skip_ws_comments_newlines()
            if self.text.startswith(",", self.pos):
                self.pos += 1

    def _inline_table(self, path: Loc) -> None:
        self.pos += 1  # {
        while self.pos < len(self.text):
            self._skip_ws_comments_newlines()
            if self.text.startswith("}", self.pos):
                self.pos += 1
                return
            if self.text.startswith(",", self.pos):
                self.pos += 1
                continue
            before = self.pos
            self._keyval(path)
            if self.pos == before:  # defensive: never spin on text we do not understand
                self.pos += 1

    # -- lexical helpers ---------------------------------------------------------------------
    def _basic_string(self) -> str:
        start = self.pos + 1
        i = start
        text = self.text
        while i < len(text) and text[i] != '"':
            i += 2 if text[i] == "\\" else 1
        self.pos = i + 1
        raw = text[start:i]
        try:
            return str(tomllib.loads(f'k = "{raw}"')["k"])
        except tomllib.TOMLDecodeError:
            return raw

    def _literal_string(self) -> str:
        end = self.text.find("'", self.pos + 1)
        end = len(self.text) if end == -1 else end
        value = self.text[self.pos + 1 : end]
        self.pos = end + 1
        return value

    def _expect(self, token: str) -> None:
        self._skip_inline_ws()
        if self.text.startswith(token, self.pos):
            self.pos += len(token)

    def _skip_inline_ws(self) -> None:
        while self.text[self.pos : self.pos + 1] in (" ", "\t"):
            self.pos += 1

    def _skip_ws_comments_newlines(self) -> None:
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch in " \t\r\n":
                self.pos += 1
            elif ch == "#":
                end = text.find("\n", self.pos)
                self.pos = len(text) if end == -1 else end + 1
            else:
                return

    def _skip_to_line_end(self) -> None:
        self._skip_inline_ws()
        if self.text.startswith("#", self.pos) or self.text[self.pos : self.pos + 1] in ("\r",):
            end = self.text.find("\n", self.pos)
            self.pos = len(self.text) if end == -1 else end + 1


def _escaped(text: str, pos: int) -> bool:
    """True when the character at `pos` is preceded by an odd number of backslashes."""
    count = 0
    while pos - count - 1 >= 0 and text[pos - count - 1] == "\\":
        count += 1
    return count % 2 == 1
