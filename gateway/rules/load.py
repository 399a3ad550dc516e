"""Loading rules/*.toml: every problem collected as `file:line: message`, one `ConfigError`."""

from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pydantic
import re2
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from gateway.errors import ConfigError, Problem
from gateway.rules.fields import FIELDS, _field_error, _is_int
from gateway.rules.match import (
    _BOOL_TESTS,
    _DAYS,
    _FOLDED,
    _HEADER_NAME,
    REGEX_MAX_MEM,
    FieldValue,
    Rule,
    RuleAction,
    _AnyOf,
    _BoolCondition,
    _combine,
    _Condition,
    _Matcher,
    _Not,
    _Option,
    _options,
    _parse_template,
    _PatternSet,
    _SizeCondition,
    _Template,
    _TimeCondition,
    _ValueCondition,
    _Values,
    _WeekdayCondition,
    glob_to_regex,
)
from gateway.rules.policy import RuleSet
from gateway.tomlpos import LineMap, Loc, dotted, load_toml, pydantic_problems

NO_CATCH_ALL = "no catch-all rule: add a last rule without [rule.match]"


# --------------------------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------------------------


class _RuleModel(BaseModel):
    """The keys of one [[rule]] table (the match and ticket tables are checked by hand)."""

    model_config = ConfigDict(extra="forbid")  # `continue` only by its alias

    name: StrictStr = Field(min_length=1)
    backend: StrictStr | None = None
    ack: Any = "default"
    followup_ack: Any = False
    action: RuleAction = "ticket"
    reason: StrictStr | None = None
    notice: StrictStr | None = None
    continue_: StrictBool = Field(False, alias="continue")
    match: dict[str, Any] | None = None
    ticket: dict[str, Any] = Field(default_factory=dict)

    @field_validator("ack", "followup_ack")
    @classmethod
    def _template_or_false(cls, value: Any) -> Any:
        if value is False or (isinstance(value, str) and value):
            return value
        raise ValueError("must be a template name or false")


@dataclass
class _Loader:
    backends: Mapping[str, str]
    templates: Collection[str] | None
    intakes: Collection[str] | None
    problems: list[Problem] = field(default_factory=list)
    pattern_sets: dict[str, _PatternSet] = field(default_factory=dict)
    header_names: dict[str, str] = field(default_factory=dict)
    file: str = ""
    lines: LineMap = field(default_factory=LineMap)
    failed: int = 0  # rules or files that could not be loaded

    def problem(self, loc: Loc, message: str) -> None:
        where = dotted(loc)
        text = f"{where}: {message}" if where else message
        self.problems.append(Problem(self.file, self.lines.line_of(loc), text))

    # -- one file -----------------------------------------------------------------------------
    def load_file(self, path: Path) -> list[Rule]:
        self.file = str(path)
        try:
            data, self.lines = load_toml(path)
        except ConfigError as exc:
            self.problems.extend(exc.problems)
            self.failed += 1
            return []
        rules: list[Rule] = []
        for key in data:
            if key != "rule":
                self.problem((key,), "unknown key (a rule file holds [[rule]] tables only)")
        raw_rules = data.get("rule", [])
        if not isinstance(raw_rules, list):
            self.problem(("rule",), "write rules as [[rule]] tables")
            return []
        for index, raw in enumerate(raw_rules):
            if not isinstance(raw, dict):
                self.problem(("rule", index), "a rule must be a table")
                continue
            rule = self.load_rule(raw, ("rule", index))
            if rule is not None:
                rules.append(rule)
        return rules

    # -- one rule -----------------------------------------------------------------------------
    def load_rule(self, raw: dict[str, Any], loc: Loc) -> Rule | None:
        before = len(self.problems)
        try:
            model = _RuleModel.model_validate(raw)
        except pydantic.ValidationError as exc:
            self.problems.extend(pydantic_problems(exc, self.file, self.lines, loc))
            model = None
        # Check match and ticket even when other keys are wrong, so one pass reports everything.
        raw_match = raw.get("match")
        conditions = (
            self.conditions(raw_match, (*loc, "match")) if isinstance(raw_match, dict) else []
        )
        backend = raw.get("backend") if isinstance(raw.get("backend"), str) else None
        if backend is not None and backend not in self.backends:
            configured = ", ".join(sorted(self.backends)) or "none"
            self.problem(
                (*loc, "backend"), f"unknown backend {backend!r} (configured: {configured})"
            )
            backend_type: str | None = "?"
        else:
            backend_type = self.backends.get(backend) if backend else None
        raw_ticket = raw.get("ticket")
        fields = (
            self.fields(raw_ticket, backend_type, (*loc, "ticket"))
            if isinstance(raw_ticket, dict)
            else {}
        )
        reason: _Template | str | None = None
        if isinstance(raw.get("reason"), str):
            reason, errors = _parse_template(raw["reason"])
            for error in errors:
                self.problem((*loc, "reason"), error)
        for key in ("ack", "followup_ack", "notice"):
            name = raw.get(key)
            if isinstance(name, str) and self.templates is not None and name not in self.templates:
                known = ", ".join(sorted(self.templates)) or "none"
                self.problem((*loc, key), f"unknown template {name!r} (known: {known})")
        if model is not None and model.action == "ticket":
            for key in ("reason", "notice"):
                if key in model.model_fields_set:
                    self.problem((*loc, key), 'applies only to action = "suppress"')
        if model is None or len(self.problems) > before:
            self.failed += 1
            return None
        match = model.match or {}
        set_keys = {k for k in model.model_fields_set if k not in ("match", "ticket", "name")}
        return Rule(
            name=model.name,
            file=self.file,
            line=self.lines.line_of(loc),
            backend=model.backend,
            action=model.action,
            ack=model.ack or None,
            followup_ack=model.followup_ack or None,
            reason=reason,
            notice=model.notice,
            continue_=model.continue_,
            conditions=tuple(sorted(conditions, key=lambda c: c.order)),
            fields=fields,
            set_keys=frozenset(set_keys),
            match_automatic=match.get("automatic")
            if isinstance(match.get("automatic"), bool)
            else None,
            match_followup=match.get("followup")
            if isinstance(match.get("followup"), bool)
            else None,
        )

    # -- [rule.ticket] ----------------------------------------------------------------------
    def fields(self, raw: dict[str, Any], backend_type: str | None, loc: Loc) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, value in raw.items():
            where = (*loc, name)
            if backend_type == "?":  # unknown backend: already reported
                error = None
            elif backend_type is not None:
                error = _field_error(backend_type, name, value)
            else:
                error = self.field_without_backend(name, value)
            if error is not None:
                self.problem(where, error)
                continue
            out[name] = self.field_value(value, where)
        return out

    def field_without_backend(self, name: str, value: Any) -> str | None:
        """A rule without backend may set a field that some configured backend type accepts."""
        types = sorted(set(self.backends.values()))
        having = [t for t in types if name in FIELDS.get(t, {})]
        if not having:
            return (
                f"{name!r} is not a field of any configured backend type "
                f"({', '.join(types) or 'no backends configured'})"
            )
        errors = [_field_error(t, name, value) for t in having]
        if all(errors):
            return (
                f"{errors[0]} ({' / '.join(having)})"
                if len(having) == 1
                else "; ".join(f"{t}: {e}" for t, e in zip(having, errors, strict=True))
            )
        return None

    def field_value(self, value: Any, loc: Loc) -> FieldValue:
        if isinstance(value, str):
            template, errors = _parse_template(value)
            for error in errors:
                self.problem(loc, error)
            return template
        if isinstance(value, dict):
            return {str(k): self.field_value(v, (*loc, k)) for k, v in value.items()}
        return value

    # -- [rule.match] ---------------------------------------------------------------------------
    def conditions(self, raw: dict[str, Any], loc: Loc) -> list[_Condition]:
        out: list[_Condition] = []
        for key, value in raw.items():
            where = (*loc, key)
            if key == "header":
                if not isinstance(value, dict) or not value:
                    self.problem(where, 'write header conditions as header."Name" = value')
                    continue
                for name, header_value in value.items():
                    if not _HEADER_NAME.fullmatch(name):
                        self.problem((*where, name), f"invalid header name {name!r}")
                        continue
                    self.header_names.setdefault(name.lower(), name)
                    fact = f"header:{name.lower()}"
                    matcher = self.matcher(header_value, (*where, name), fact, fold=False)
                    if matcher is not None:
                        out.append(_ValueCondition(fact, f"header.{name}", matcher, 5))
            elif key in _TEXT_CONDITIONS:
                matcher = self.matcher(value, where, key, fold=key in _FOLDED)
                if matcher is not None:
                    if key == "intake":
                        self.check_intakes(matcher, where)
                    out.append(_ValueCondition(key, key, matcher, _TEXT_CONDITIONS[key]))
            elif key in ("has_attachment", "automatic", "followup"):
                if not isinstance(value, bool):
                    self.problem(where, "must be true or false")
                    continue
                out.append(_BoolCondition(key, value, _BOOL_TESTS[key]))
            elif key in ("size_min", "size_max"):
                size = _parse_size(value)
                if size is None:
                    self.problem(where, 'must be a size in bytes: an integer or "10k", "5M", "1G"')
                    continue
                out.append(_SizeCondition(key, size))
            elif key == "weekday":
                days = self.weekdays(value, where)
                if days is not None:
                    out.append(_WeekdayCondition(days, _written(value)))
            elif key == "time":
                windows = self.windows(value, where)
                if windows is not None:
                    out.append(_TimeCondition(windows, _written(value)))
            else:
                known = ", ".join(sorted([*_TEXT_CONDITIONS, "header.NAME", *_OTHER_CONDITIONS]))
                self.problem(where, f"unknown condition {key!r} (known: {known})")
        if "size_min" in raw and "size_max" in raw:
            low, high = _parse_size(raw["size_min"]), _parse_size(raw["size_max"])
            if low is not None and high is not None and low > high:
                self.problem((*loc, "size_max"), "size_max is below size_min: never matches")
        return out

    def matcher(self, value: Any, loc: Loc, fact: str, *, fold: bool) -> _Matcher | None:
        if isinstance(value, str):
            if "*" in value or "?" in value:
                return self.pattern(glob_to_regex(value), f"glob {value!r}", loc, fact, fold)
            return _exact(value, fold)
        if isinstance(value, list):
            if not value:
                self.problem(loc, "an empty list never matches")
                return None
            options: list[_Matcher] = []
            for i, item in enumerate(value):
                if isinstance(item, list):
                    self.problem((*loc, i), "a list inside a list")
                    continue
                m = self.matcher(item, (*loc, i), fact, fold=fold)
                if m is not None:
                    options.append(m)
            if len(options) != len(value):
                return None
            return _combine(options)
        if isinstance(value, dict):
            if len(value) != 1 or next(iter(value)) not in ("regex", "glob", "exact", "not"):
                self.problem(
                    loc,
                    "a table value must be one of {regex = ...}, {glob = ...}, "
                    "{exact = ...}, {not = ...}",
                )
                return None
            kind, inner = next(iter(value.items()))
            if kind == "not":
                m = self.matcher(inner, (*loc, kind), fact, fold=fold)
                return None if m is None else _Not(m)
            if not isinstance(inner, str):
                self.problem((*loc, kind), "must be a string")
                return None
            if kind == "exact":
                return _exact(inner, fold)
            if kind == "glob":
                return self.pattern(glob_to_regex(inner), f"glob {inner!r}", loc, fact, fold)
            return self.pattern(inner, f"regex {inner!r}", (*loc, kind), fact, fold, user=True)
        self.problem(loc, "must be a string, a list, or a table such as {regex = ...}")
        return None

    def pattern(
        self, pattern: str, desc: str, loc: Loc, fact: str, fold: bool, *, user: bool = False
    ) -> _Matcher | None:
        if user and not pattern:
            self.problem(loc, "an empty regex matches everything; remove the condition instead")
            return None
        wrapped = ("(?i:" if fold else "(?:") + pattern + ")"
        try:
            re2.compile(pattern, _options(REGEX_MAX_MEM))
            single = re2.compile(wrapped, _options(REGEX_MAX_MEM))
        except re2.error as exc:
            detail = exc.args[0] if exc.args else ""
            if isinstance(detail, bytes):
                detail = detail.decode("utf-8", "replace")
            what = "regex" if user else "glob"
            self.problem(loc, f"invalid {what} {pattern!r} (RE2 syntax): {detail}")
            return None
        group = self.pattern_sets.setdefault(fact, _PatternSet())
        return _Values([_Option(None, group.add(wrapped, single), desc)])

    def check_intakes(self, matcher: _Matcher, loc: Loc) -> None:
        if self.intakes is None:
            return
        known = {i.lower() for i in self.intakes}
        for exact in _exacts(matcher):
            if exact not in known:
                names = ", ".join(sorted(self.intakes)) or "none"
                self.problem(loc, f"unknown intake {exact!r} (known: {names})")

    def weekdays(self, value: Any, loc: Loc) -> frozenset[int] | None:
        items = value if isinstance(value, list) else [value]
        days: set[int] = set()
        for i, item in enumerate(items):
            where = (*loc, i) if isinstance(value, list) else loc
            parsed = _parse_days(item)
            if parsed is None:
                self.problem(where, f'bad weekday {item!r}: use "mon".."sun" or a range "mon-fri"')
                return None
            days |= parsed
        if not days:
            self.problem(loc, "an empty list never matches")
            return None
        return frozenset(days)

    def windows(self, value: Any, loc: Loc) -> list[tuple[int, int]] | None:
        items = value if isinstance(value, list) else [value]
        out: list[tuple[int, int]] = []
        for i, item in enumerate(items):
            where = (*loc, i) if isinstance(value, list) else loc
            window = _parse_window(item)
            if isinstance(window, str):
                self.problem(where, window)
                return None
            out.append(window)
        if not out:
            self.problem(loc, "an empty list never matches")
            return None
        return out


def _exact(value: str, fold: bool) -> _Values:
    return _Values([_Option(value.lower() if fold else value, -1, repr(value))])


def _exacts(matcher: _Matcher) -> Iterator[str]:
    """The exact values a matcher names (to check intake names)."""
    if isinstance(matcher, _Values):
        yield from (o.exact for o in matcher.options if o.exact is not None)
    elif isinstance(matcher, _AnyOf):
        for option in matcher.options:
            yield from _exacts(option)
    elif isinstance(matcher, _Not):
        yield from _exacts(matcher.inner)


def _written(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


_TEXT_CONDITIONS: dict[str, int] = {  # condition → evaluation order (cheap first)
    "intake": 1,
    "recipient": 3,
    "envelope_recipient": 3,
    "to": 3,
    "cc": 3,
    "sender": 3,
    "sender_domain": 3,
    "attachment": 4,
    "subject": 6,
    "body": 9,
}
_OTHER_CONDITIONS = (
    "has_attachment",
    "size_min",
    "size_max",
    "weekday",
    "time",
    "automatic",
    "followup",
)


_SIZE = re.compile(r"\s*(\d+)\s*([kmg]?)i?b?\s*", re.IGNORECASE)


def _parse_size(value: Any) -> int | None:
    if _is_int(value):
        return int(value) if value >= 0 else None
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m:
            scale = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]
            return int(m.group(1)) * scale
    return None


def _parse_days(item: Any) -> set[int] | None:
    if not isinstance(item, str):
        return None
    text = item.strip().lower()
    if text in _DAYS:
        return {_DAYS.index(text)}
    first, sep, last = text.partition("-")
    if sep and first.strip() in _DAYS and last.strip() in _DAYS:
        a, b = _DAYS.index(first.strip()), _DAYS.index(last.strip())
        return {(a + i) % 7 for i in range((b - a) % 7 + 1)}
    return None


_WINDOW = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*")


def _parse_window(item: Any) -> tuple[int, int] | str:
    bad = f'bad time window {item!r}: write "HH:MM-HH:MM" such as "08:00-17:00"'
    if not isinstance(item, str):
        return bad
    m = _WINDOW.fullmatch(item)
    if not m:
        return bad
    h1, m1, h2, m2 = (int(g) for g in m.groups())
    if h1 > 23 or m1 > 59 or h2 > 24 or m2 > 59 or (h2 == 24 and m2 != 0):
        return f"bad time window {item!r}: hours run 00-23 (24:00 may end a window), minutes 00-59"
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        return f'empty time window {item!r} (for the whole day write "00:00-24:00")'
    if end == 24 * 60:
        end = 24 * 60  # [start, 24:00) is a normal window
    return start, end


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_rules(
    rules_dir: Path,
    backends: Mapping[str, str],
    *,
    timezone: str = "UTC",
    templates: Collection[str] | None = None,
    intakes: Collection[str] | None = None,
) -> RuleSet:
    """Read and check rules_dir/*.toml (file-name order); raise ConfigError with every problem.

    `backends` maps each configured backend name to its type. `templates` and `intakes`, when
    given, are the names that `ack`/`followup_ack`/`notice` and `match.intake` may use (only
    names written in rules are checked; the implicit `ack = "default"` is the config's business).
    Problems that concern the directory rather than a line (no rule files, unknown time zone)
    carry line 0.
    """
    loader = _Loader(backends=backends, templates=templates, intakes=intakes)
    directory = str(rules_dir)
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        loader.problems.append(Problem(directory, 0, f"unknown time zone {timezone!r}"))
        zone = ZoneInfo("UTC")
    for name, kind in backends.items():
        if kind not in FIELDS:
            loader.problems.append(
                Problem(directory, 0, f"backend {name!r} has unknown type {kind!r}")
            )
    files = sorted(rules_dir.glob("*.toml")) if rules_dir.is_dir() else []
    if not rules_dir.is_dir():
        loader.problems.append(Problem(directory, 0, "rules directory does not exist"))
    rules: list[Rule] = []
    for path in files:
        rules.extend(loader.load_file(path))

    _check_order(rules, files, directory, loader.problems, complete=not loader.failed)
    if loader.problems:
        raise ConfigError(loader.problems)
    for group in loader.pattern_sets.values():
        group.build()
    return RuleSet(rules, backends, zone, loader.pattern_sets, loader.header_names, files)


def _check_order(
    rules: list[Rule],
    files: list[Path],
    directory: str,
    problems: list[Problem],
    *,
    complete: bool,
) -> None:
    """Duplicate names, the catch-all, and rules that can never match because of it.

    When some rule could not be loaded (`complete` false), a missing catch-all is not reported:
    the broken rule may well be the catch-all, and its own problem says what to fix.
    """

    def add(rule: Rule, message: str) -> None:
        problems.append(Problem(rule.file, rule.line, message))

    seen: dict[str, Rule] = {}
    catch_all: Rule | None = None
    backend_so_far = False  # set by an earlier always-matching continue rule
    for rule in rules:
        first = seen.setdefault(rule.name, rule)
        if first is not rule:
            add(rule, f"duplicate rule name {rule.name!r} (first at {first.file}:{first.line})")
        if catch_all is not None:
            add(
                rule,
                f"rule {rule.name!r} can never match: catch-all rule {catch_all.name!r} "
                f"({catch_all.file}:{catch_all.line}) stands before it",
            )
        elif rule.is_catch_all:
            catch_all = rule
        elif not rule.conditions and rule.backend:
            backend_so_far = True
    if catch_all is None:
        if not complete:
            return
        if rules:
            problems.append(Problem(rules[-1].file, rules[-1].line, NO_CATCH_ALL))
        else:
            where = str(files[-1]) if files else directory
            problems.append(Problem(where, 1 if files else 0, NO_CATCH_ALL))
    elif catch_all.action == "suppress":
        add(
            catch_all,
            f"catch-all rule {catch_all.name!r} suppresses all other mail; "
            "the last rule without [rule.match] must make tickets (set a backend)",
        )
    elif not catch_all.backend and not backend_so_far:
        add(catch_all, f"catch-all rule {catch_all.name!r} needs a backend")
