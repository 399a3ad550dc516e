"""The routing rules: loading and checking rules/*.toml, and routing one mail to one `Decision`.

This module owns the rule language (reference below), its validation (`load_rules` collects every
problem as `file:line: message` and raises one `ConfigError`) and the routing policy that wraps it
(loops, automatic mail, follow-ups). It is pure: the only I/O is reading the rule files at load;
the clock and what `classify` found are inputs (`RouteContext`), so `gateway route` (the dry run)
and the daemon decide the same way.

Rule files
    rules/*.toml, read in file-name order; each holds `[[rule]]` tables:

        [[rule]]
        name = "billing"            # unique over all files
        backend = "whmcs"           # a [backends.NAME] from config; later matching rules override
        ack = "default"             # acknowledgement template for new tickets, or false
        followup_ack = false        # template for follow-ups, or false (the default)
        action = "ticket"           # ticket | suppress
        reason = "newsletter"       # suppress only: recorded with the mail (placeholders allowed)
        notice = "suppressed"       # suppress only: template of a notice to the sender (optional)
        continue = false            # true: later matching rules add or override keys and fields
        [rule.match]                # every condition must hold; no [rule.match] = matches all
        recipient = "billing@example.com"
        [rule.ticket]               # fields for the backend's type (DESIGN), checked at load
        deptid = 2

Evaluation: rules are tried in order; a matching rule with `continue = true` contributes its keys
(backend, ack, action, ...; the last one that sets a key wins) and ticket fields (tables such as
`extra` and `customfields` are merged key by key), and evaluation goes on; the first matching rule
without `continue` ends it. A catch-all (a rule without conditions, without `continue`, with a
backend) must exist; rules after the first catch-all can never match and are reported.

Conditions (`[rule.match]`), checked cheapest first:
    recipient           any of the mail's recipients: the envelope recipients AND the To and Cc
                        addresses (a mail to several support addresses is routed once, seeing all)
    envelope_recipient  envelope recipients only;  to / cc: that header's addresses only
    sender              the From address (the envelope sender when there is no From)
    sender_domain       the part of `sender` after the last "@"
    subject, body       decoded text; body = the plain-text body, of which only the first
                        `BODY_LIMIT` characters (1 MiB) are examined
    header.NAME         any occurrence of header NAME (name case-insensitive, decoded value);
                        a missing header matches nothing (so `{ not = "*" }` means "absent")
    attachment          any attachment's file name;  has_attachment = true | false
                        (inline parts referenced from the HTML body do not count as attachments)
    size_min, size_max  the whole message in bytes, inclusive; an integer or "10k", "5M", "1G"
    intake              "smtp", "pipe" or the name of an [[imap]] section
    weekday             ["mon", "tue"...] or ranges "mon-fri" (wrapping: "fri-mon")
    time                "08:00-17:00" or a list of windows; start inclusive, end exclusive,
                        "22:00-06:00" spans midnight; "24:00" may end a window. Weekday and time
                        are read in the configured time zone at the moment of routing.
    automatic           true: the mail is auto-generated (see policy);  false: it is not
    followup            true: the mail follows up a known ticket;  false: it does not

Values of text conditions:
    "text"              exact: the whole value equals it
    "*text?"            a glob when it holds * or ? (only these two are special; * and ? match
                        any characters including newlines); the whole value must match
    { exact = "a*" }    exact even with * or ?;  { glob = "..." } glob even without
    { regex = "..." }   RE2 syntax, search semantics (anchor with ^ and $ yourself)
    ["a", "b*", {...}]  any of the values
    { not = VALUE }     holds when VALUE does not hold: for a condition over several items
                        (recipients, header occurrences, attachments) it means "none matches"
Case: addresses, domains, intake names and attachment file names compare case-insensitively in all
three forms (exact, glob and regex). Subject, body and header values are case-sensitive in exact and
glob form; a regex is as written (use `(?i)` to fold case). Regexes and globs are compiled to RE2
(linear time, memory bounded by `REGEX_MAX_MEM`), so no subject can make matching backtrack.

Placeholders, in ticket field strings and in `reason`: {sender}, {sender_name}, {sender_domain},
{recipient} (the address a `recipient` condition matched, else the first envelope recipient, else
the first To/Cc address), {subject}, {date} (the Date header as written), {header:NAME} (first
occurrence); a missing value expands to "". Line breaks in values become spaces. `{{` and `}}`
are literal braces; any other placeholder is a load-time problem.

Policy (issue 6; applied around the rules):
    loop (mail from one of our own addresses)  -> suppress, never acknowledged; no rule overrides
    automatic mail that is a follow-up         -> added to its ticket, marked automatic, no ack
    other automatic mail                       -> suppressed with the reason, unless a matching
                                                  rule says `match.automatic = true` (then it is
                                                  routed by the rules, still never acknowledged)
    follow-up                                  -> action "followup" on the known ticket's backend
                                                  (else the rules' backend); ack = `followup_ack`,
                                                  or the `ack` of a rule with `match.followup =
                                                  true`; none by default
    a matching `action = "suppress"` rule suppresses follow-ups too.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pydantic
import re2
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from gateway.errors import ConfigError, Problem
from gateway.models import Decision, Envelope, ParsedMail
from gateway.tomlpos import LineMap, Loc, dotted, load_toml, pydantic_problems

BODY_LIMIT = 1 << 20  # characters of the body examined by `body` conditions
REGEX_MAX_MEM = 8 << 20  # RE2 memory bound of one compiled regex or glob
SET_MAX_MEM = 64 << 20  # RE2 memory bound of one combined pattern set (one per mail property)

BACKEND_TYPES = ("superoffice-soap", "superoffice-rest", "interserver", "whmcs")
NO_CATCH_ALL = "no catch-all rule: add a last rule without [rule.match]"

RuleAction = Literal["ticket", "suppress"]


@dataclass(frozen=True)
class RouteContext:
    """Everything `route` needs besides the mail: the clock and what `classify` found.

    `now` must be time-zone aware. `auto_reason` is set when the mail is auto-generated (why),
    `loop_reason` when it comes from one of our own addresses, `followup_ref` when it follows up
    a known ticket (its ref) and `followup_backend` when the spool knows that ticket's backend.
    """

    now: datetime
    auto_reason: str | None = None
    loop_reason: str | None = None
    followup_ref: str | None = None
    followup_backend: str | None = None

    def __post_init__(self) -> None:
        if self.now.tzinfo is None or self.now.utcoffset() is None:
            raise ValueError("RouteContext.now must be time-zone aware")


# --------------------------------------------------------------------------------------------
# Value matchers
# --------------------------------------------------------------------------------------------

_FOLDED = frozenset(
    {
        "recipient",
        "envelope_recipient",
        "to",
        "cc",
        "sender",
        "sender_domain",
        "intake",
        "attachment",
    }
)


def _options(max_mem: int) -> re2.Options:
    options = re2.Options()
    options.max_mem = max_mem
    options.log_errors = False
    options.never_capture = True
    return options


def glob_to_regex(glob: str) -> str:
    """A glob (only * and ? are special) as an RE2 pattern matching the whole text."""
    out = []
    for ch in glob:
        if ch == "*":
            out.append(".*")
        elif ch == "?":
            out.append(".")
        else:
            out.append(re2.escape(ch))
    return r"\A(?s:" + "".join(out) + r")\z"


class _PatternSet:
    """All glob/regex patterns used on one mail property, searched in one pass per item.

    Index 0 is a sentinel that matches every text: a result without it means that RE2's DFA gave
    up (memory), and the patterns are then searched one by one, never silently skipped.
    """

    def __init__(self) -> None:
        self.patterns: list[str] = [""]
        self.singles: list[Any] = [None]
        self.set: Any = None

    def add(self, pattern: str, single: Any) -> int:
        self.patterns.append(pattern)
        self.singles.append(single)
        return len(self.patterns) - 1

    def build(self) -> None:
        try:
            combined = re2.Set.SearchSet(_options(SET_MAX_MEM))
            for pattern in self.patterns:
                combined.Add(pattern)
            combined.Compile()
        except re2.error:
            self.set = None  # too big for one automaton: search pattern by pattern
        else:
            self.set = combined

    def hits(self, text: bytes) -> frozenset[int] | None:
        """Indices of the patterns found in `text`, or None when the set could not decide."""
        if self.set is None:
            return None
        found = self.set.Match(text)
        if not found or 0 not in found:
            return None
        return frozenset(found)


MISS = -1  # find(): the value does not hold
HOLDS = -2  # find(): it holds, but not because of one item (a negation)


class _Matcher:
    """One value form of a condition.

    `find` is the fast path (no strings): the index of the first item that matched, or MISS, or
    HOLDS for a negation that holds. `explain` builds the reason text, only where one is shown.
    """

    desc: str

    def find(self, fact: _Fact) -> int:
        raise NotImplementedError

    def explain(self, fact: _Fact, found: int) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class _Option:
    """One value of a list: exact text (already case-folded where that applies) or a pattern."""

    exact: str | None
    index: int  # the pattern's index in its fact's _PatternSet; -1 for exact values
    desc: str


class _Values(_Matcher):
    """Any of some exact values and patterns (one value is a list of one)."""

    def __init__(self, options: list[_Option]) -> None:
        self.options = options
        self.exacts = frozenset(o.exact for o in options if o.exact is not None)
        self.indices = frozenset(o.index for o in options if o.exact is None)
        descs = [o.desc for o in options]
        self.desc = descs[0] if len(descs) == 1 else "any of [" + ", ".join(descs) + "]"

    def find(self, fact: _Fact) -> int:
        exacts, indices = self.exacts, self.indices
        any_pattern = fact.route.any_pattern
        for i, item in enumerate(fact.items):
            if item in exacts or (indices and any_pattern(fact, i, indices)):
                return i
        return MISS

    def explain(self, fact: _Fact, found: int) -> str:
        if found < 0:
            verb = "did not match" if len(self.options) == 1 else "matched none of"
            desc = self.desc if len(self.options) == 1 else self.desc.removeprefix("any of ")
            return f"{fact.label} {fact.show_all()} {verb} {desc}"
        item = fact.items[found]
        option = next(
            o
            for o in self.options
            if (o.exact == item if o.exact is not None else fact.any_pattern(found, {o.index}))
        )
        return f"{fact.label} {fact.show(item)} matched {option.desc}"


class _AnyOf(_Matcher):
    """A list that holds negations besides plain values."""

    def __init__(self, options: list[_Matcher]) -> None:
        self.options = options
        self.desc = "any of [" + ", ".join(m.desc for m in options) + "]"

    def find(self, fact: _Fact) -> int:
        for option in self.options:
            found = option.find(fact)
            if found != MISS:
                return found
        return MISS

    def explain(self, fact: _Fact, found: int) -> str:
        if found == MISS:
            return f"{fact.label} {fact.show_all()} matched none of {self.desc[7:]}"
        for option in self.options:
            hit = option.find(fact)
            if hit != MISS:
                return option.explain(fact, hit)
        return self.desc  # pragma: no cover - find() said one option holds


class _Not(_Matcher):
    def __init__(self, inner: _Matcher) -> None:
        self.inner = inner
        self.desc = f"not {inner.desc}"

    def find(self, fact: _Fact) -> int:
        return HOLDS if self.inner.find(fact) == MISS else MISS

    def explain(self, fact: _Fact, found: int) -> str:
        if found == HOLDS:
            return f"{fact.label} {fact.show_all()} did not match {self.inner.desc} (as required)"
        inner = self.inner.find(fact)
        return f"{self.inner.explain(fact, inner)} (the rule says not)"


def _combine(matchers: list[_Matcher]) -> _Matcher:
    """A list of values: plain values are merged into one fast `_Values`."""
    plain: list[_Option] = []
    others: list[_Matcher] = []
    for m in matchers:
        if isinstance(m, _Values):
            plain.extend(m.options)
        else:
            others.append(m)
    if not others:
        return _Values(plain)
    if not plain and len(others) == 1:
        return others[0]
    return _AnyOf(([_Values(plain)] if plain else []) + others)


# --------------------------------------------------------------------------------------------
# What one route call knows about the mail (computed lazily, once)
# --------------------------------------------------------------------------------------------


class _Fact:
    """The items of one mail property a condition looks at (e.g. all recipients)."""

    __slots__ = ("_bytes", "items", "key", "label", "route", "secret")

    def __init__(
        self, route: _RouteState, key: str, label: str, items: Sequence[str], secret: bool = False
    ) -> None:
        self.route = route
        self.key = key
        self.label = label
        self.items = items
        self.secret = secret  # the body: never quoted in reasons
        self._bytes: list[bytes] | None = None

    def encoded(self, i: int) -> bytes:
        if self._bytes is None:
            self._bytes = [item.encode("utf-8", "surrogatepass") for item in self.items]
        return self._bytes[i]

    def any_pattern(self, i: int, indices: Collection[int]) -> bool:
        """Whether any of the patterns `indices` (of this fact's set) is found in item i."""
        return self.route.any_pattern(self, i, indices)

    def show(self, item: str) -> str:
        if self.secret:
            return "(text)"
        return _short(item, quote=self.key not in _FOLDED)

    def show_all(self) -> str:
        if self.secret:
            return "(text)" if self.items and self.items[0] else "(empty)"
        if not self.items:
            return "(none)"
        if len(self.items) == 1:
            return _short(self.items[0], quote=self.key not in _FOLDED)
        return (
            "["
            + ", ".join(_short(i) for i in self.items[:5])
            + (", ...]" if len(self.items) > 5 else "]")
        )


def _short(text: str, limit: int = 80, *, quote: bool = False) -> str:
    shown = text if len(text) <= limit else text[:limit] + "..."
    return repr(shown) if (quote or not shown or " " in shown) else shown


class _RouteState:
    """Per-route cache: mail properties, pattern-set results, the local time."""

    def __init__(self, rules: RuleSet, mail: ParsedMail, env: Envelope, ctx: RouteContext) -> None:
        self.rules = rules
        self.mail = mail
        self.env = env
        self.ctx = ctx
        self._facts: dict[str, _Fact] = {}
        self._hits: dict[tuple[str, int], frozenset[int] | None] = {}
        self._singles: dict[tuple[str, int, int], bool] = {}
        self._local: datetime | None = None
        self.matched_recipient: str | None = None

    # -- mail properties ----------------------------------------------------------------------
    @property
    def sender(self) -> str:
        return (self.mail.from_addr or self.env.mail_from).strip().lower()

    def fact(self, key: str) -> _Fact:
        found = self._facts.get(key)
        if found is None:
            found = self._make_fact(key)
            self._facts[key] = found
        return found

    def _make_fact(self, key: str) -> _Fact:
        mail, env = self.mail, self.env
        items: Sequence[str]
        secret = False
        label = key
        if key == "recipient":
            items = _unique([*env.rcpt_tos, *mail.to, *mail.cc])
        elif key == "envelope_recipient":
            items = _unique(env.rcpt_tos)
        elif key == "to":
            items = _unique(mail.to)
        elif key == "cc":
            items = _unique(mail.cc)
        elif key == "sender":
            items = (self.sender,)
        elif key == "sender_domain":
            items = (self.sender.rpartition("@")[2],)
        elif key == "intake":
            items = (env.intake.lower(),)
        elif key == "attachment":
            items = tuple(a.filename.lower() for a in mail.attachments if not a.inline)
        elif key == "subject":
            items = (mail.subject,)
        elif key == "body":
            items = (mail.text[:BODY_LIMIT],)
            secret = True
        elif key.startswith("header:"):
            name = key.removeprefix("header:")
            items = tuple(mail.header_all(name))
            label = f"header {self.rules.header_names.get(name, name)}"
        else:  # pragma: no cover - keys come from _CONDITIONS
            raise KeyError(key)
        return _Fact(self, key, label, items, secret)

    def any_pattern(self, fact: _Fact, i: int, indices: Collection[int]) -> bool:
        key = (fact.key, i)
        try:
            hits = self._hits[key]
        except KeyError:
            hits = self._hits[key] = self.rules.pattern_sets[fact.key].hits(fact.encoded(i))
        if hits is not None:
            return not hits.isdisjoint(indices)
        # The set could not decide: search the patterns one by one (cached for this mail).
        for index in indices:
            single_key = (fact.key, index, i)
            found = self._singles.get(single_key)
            if found is None:
                regex = self.rules.pattern_sets[fact.key].singles[index]
                found = self._singles[single_key] = regex.search(fact.encoded(i)) is not None
            if found:
                return True
        return False

    def local_time(self) -> datetime:
        if self._local is None:
            self._local = self.ctx.now.astimezone(self.rules.zone)
        return self._local

    # -- placeholders ---------------------------------------------------------------------------
    def placeholder(self, name: str, arg: str) -> str:
        mail = self.mail
        if name == "sender":
            value = self.sender
        elif name == "sender_name":
            value = mail.from_name
        elif name == "sender_domain":
            value = self.sender.rpartition("@")[2]
        elif name == "recipient":
            value = (
                self.matched_recipient
                or next(iter([*self.env.rcpt_tos, *mail.to, *mail.cc]), "").lower()
            )
        elif name == "subject":
            value = mail.subject
        elif name == "date":
            value = mail.date
        else:  # header
            value = mail.header(arg) or ""
        return _ONE_LINE.sub(" ", value)


_ONE_LINE = re.compile(r"[\r\n]+")


def _unique(items: Sequence[str]) -> tuple[str, ...]:
    seen: dict[str, None] = {}
    for item in items:
        low = item.strip().lower()
        if low:
            seen.setdefault(low)
    return tuple(seen)


# --------------------------------------------------------------------------------------------
# Conditions
# --------------------------------------------------------------------------------------------


class _Condition:
    """One key of [rule.match]."""

    order = 5
    name = ""

    def check(self, state: _RouteState) -> tuple[bool, str]:
        """Whether the condition holds, and why."""
        raise NotImplementedError

    def holds(self, state: _RouteState) -> bool:
        return self.check(state)[0]


class _ValueCondition(_Condition):
    def __init__(self, key: str, name: str, matcher: _Matcher, order: int) -> None:
        self.key = key  # fact key
        self.name = name
        self.matcher = matcher
        self.order = order

    def holds(self, state: _RouteState) -> bool:
        return self.matcher.find(state.fact(self.key)) != MISS

    def check(self, state: _RouteState) -> tuple[bool, str]:
        fact = state.fact(self.key)
        found = self.matcher.find(fact)
        if found >= 0 and self.key == "recipient":
            state.matched_recipient = fact.items[found]
        return found != MISS, self.matcher.explain(fact, found)


class _BoolCondition(_Condition):
    order = 0

    def __init__(self, name: str, want: bool, test: Callable[[_RouteState], tuple[bool, str]]):
        self.name = name
        self.want = want
        self.test = test

    def check(self, state: _RouteState) -> tuple[bool, str]:
        value, what = self.test(state)
        return value == self.want, what


class _SizeCondition(_Condition):
    order = 1

    def __init__(self, name: str, limit: int) -> None:
        self.name = name
        self.limit = limit

    def check(self, state: _RouteState) -> tuple[bool, str]:
        size = state.mail.size
        if self.name == "size_min":
            return (
                size >= self.limit,
                f"size {size} {'>=' if size >= self.limit else '<'} {self.limit}",
            )
        return size <= self.limit, f"size {size} {'<=' if size <= self.limit else '>'} {self.limit}"


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class _WeekdayCondition(_Condition):
    order = 2
    name = "weekday"

    def __init__(self, days: frozenset[int], written: str) -> None:
        self.days = days
        self.written = written

    def check(self, state: _RouteState) -> tuple[bool, str]:
        local = state.local_time()
        day = local.weekday()
        ok = day in self.days
        return (
            ok,
            f"weekday {_DAYS[day]} ({local.tzname()}) {'in' if ok else 'not in'} {self.written}",
        )


class _TimeCondition(_Condition):
    order = 2
    name = "time"

    def __init__(self, windows: list[tuple[int, int]], written: str) -> None:
        self.windows = windows  # minutes since midnight, [start, end)
        self.written = written

    def check(self, state: _RouteState) -> tuple[bool, str]:
        local = state.local_time()
        minute = local.hour * 60 + local.minute
        ok = any(
            (start <= minute < end) if start < end else (minute >= start or minute < end)
            for start, end in self.windows
        )
        where = "inside" if ok else "outside"
        return ok, f"time {local:%H:%M} ({local.tzname()}) {where} {self.written}"


# --------------------------------------------------------------------------------------------
# Placeholders
# --------------------------------------------------------------------------------------------

_PLACEHOLDERS = ("sender", "sender_name", "sender_domain", "recipient", "subject", "date")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 field name: printable ASCII except ":"


@dataclass(frozen=True)
class _Template:
    """A string with placeholders, split at load into literal text and (name, arg) parts."""

    parts: tuple[str | tuple[str, str], ...]

    def expand(self, state: _RouteState) -> str:
        return "".join(p if isinstance(p, str) else state.placeholder(*p) for p in self.parts)


def _parse_template(text: str) -> tuple[_Template | str, list[str]]:
    """Split `text`; return the template (or plain str when it has none) and the problems."""
    parts: list[str | tuple[str, str]] = []
    errors: list[str] = []
    pos = 0
    plain = True
    for m in _PLACEHOLDER.finditer(text):
        if m.start() > pos:
            parts.append(text[pos : m.start()])
        pos = m.end()
        token = m.group()
        if token in ("{{", "}}"):
            parts.append(token[0])
            continue
        if token in ("{", "}"):
            errors.append(f"unbalanced {token!r} (write {token * 2} for a literal brace)")
            continue
        name = m.group(1)
        plain = False
        if name in _PLACEHOLDERS:
            parts.append((name, ""))
        elif name.startswith("header:") and _HEADER_NAME.fullmatch(name[7:]):
            parts.append(("header", name[7:]))
        else:
            known = ", ".join("{" + p + "}" for p in (*_PLACEHOLDERS, "header:NAME"))
            errors.append(f"unknown placeholder {{{name}}} (known: {known})")
    if pos < len(text):
        parts.append(text[pos:])
    if plain:
        return "".join(p for p in parts if isinstance(p, str)), errors
    return _Template(tuple(parts)), errors


# --------------------------------------------------------------------------------------------
# Ticket fields per backend type (DESIGN: "Ticket fields in rules, per backend type")
# --------------------------------------------------------------------------------------------

_FieldCheck = Callable[[Any], str | None]  # error message, or None when the value is fine


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _id(v: Any) -> str | None:
    return None if _is_int(v) and v >= 1 else "must be an id (an integer, 1 or more)"


def _soap_priority(v: Any) -> str | None:
    if _is_int(v) and (v >= 1 or v == -1):
        return None
    return "must be a priority id (1 or more) or -1 (let SuperOffice decide)"


def _slevel(v: Any) -> str | None:
    if v in ("external", "internal") and isinstance(v, str):
        return None
    if _is_int(v) and v in (1, 2):
        return None
    return 'must be "external", "internal", 2 (external) or 1 (internal)'


def _whmcs_priority(v: Any) -> str | None:
    return None if v in ("Low", "Medium", "High") else 'must be "Low", "Medium" or "High"'


def _lookup_or_id(v: Any) -> str | None:
    if v == "lookup" or (_is_int(v) and v >= 1):
        return None
    return 'must be "lookup" (find by the sender\'s address) or an id (an integer, 1 or more)'


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be true or false"


def _text(v: Any) -> str | None:
    return None if isinstance(v, str) else "must be a string"


def _table(key_pattern: str, what: str, values: Callable[[Any], bool]) -> _FieldCheck:
    keys = re.compile(key_pattern)

    def check(v: Any) -> str | None:
        if not isinstance(v, dict):
            return f"must be a table of {what}"
        for key, value in v.items():
            if not keys.fullmatch(str(key)):
                return f"key {key!r} is not {what.split(' ')[0]}"
            if not values(value):
                return f"value of {key!r} must be a string"
        return None

    return check


FIELDS: dict[str, dict[str, _FieldCheck]] = {
    "superoffice-soap": {
        "category": _id,
        "priority": _soap_priority,
        "slevel": _slevel,
        "extra": _table(r"x_\d+", "x_N → string", lambda v: isinstance(v, str)),
    },
    "superoffice-rest": {
        "category": _id,
        "priority": _id,
        "slevel": _slevel,
        "person": _lookup_or_id,
        "notify": _bool,
    },
    "interserver": {"product": _text},
    "whmcs": {
        "deptid": _id,
        "priority": _whmcs_priority,
        "serviceid": _id,
        "customfields": _table(r"\d+", "id → value", lambda v: isinstance(v, str) or _is_int(v)),
        "client": _lookup_or_id,
        "noemail": _bool,
    },
}


# Fields a rule must never set, whatever its backend, and why (where they come from instead).
CONFIG_ONLY_FIELDS: dict[str, str] = {
    "box_auth_value": (
        "box_auth_value may not be set by a rule: InterServer stores it encrypted as the "
        "ticket's 'Root Password (VPS / Dedicated Server)' field, so it must never come from "
        "mail content; set it (if at all) in config: [backends.NAME] box_auth_value_file"
    ),
}


def _field_error(backend_type: str, name: str, value: Any) -> str | None:
    if name in CONFIG_ONLY_FIELDS:
        return CONFIG_ONLY_FIELDS[name]
    checks = FIELDS.get(backend_type, {})
    if name not in checks:
        return f"{name!r} is not a {backend_type} field (those are: {', '.join(checks)})"
    return checks[name](value)


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


FieldValue = Any  # str | _Template | int | bool | dict[str, FieldValue]


@dataclass(frozen=True)
class Rule:
    """One compiled rule. `set_keys` names the keys the rule wrote (they override on continue)."""

    name: str
    file: str
    line: int
    backend: str | None
    action: RuleAction
    ack: str | None  # None = no acknowledgement (ack = false)
    followup_ack: str | None
    reason: _Template | str | None
    notice: str | None
    continue_: bool
    conditions: tuple[_Condition, ...]
    fields: dict[str, FieldValue]
    set_keys: frozenset[str]
    match_automatic: bool | None = None  # the value of match.automatic, when written
    match_followup: bool | None = None

    @property
    def is_catch_all(self) -> bool:
        return not self.conditions and not self.continue_

    def evaluate(self, state: _RouteState) -> tuple[bool, list[str]]:
        """Whether every condition holds; the explanation (all of them, or the first failure)."""
        for condition in self.conditions:  # fast path first: no strings for conditions that
            if not condition.holds(state):  # hold in a rule that fails anyway
                return False, [condition.check(state)[1]]
        why = [condition.check(state)[1] for condition in self.conditions]
        return True, why or ["no conditions (matches every mail)"]


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
            if name in CONFIG_ONLY_FIELDS:
                error = CONFIG_ONLY_FIELDS[name]
            elif backend_type == "?":  # unknown backend: already reported
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


def _test_has_attachment(state: _RouteState) -> tuple[bool, str]:
    names = [a.filename for a in state.mail.attachments if not a.inline]
    if names:
        return True, f"has {len(names)} attachment(s)"
    return False, "has no attachment"


def _test_automatic(state: _RouteState) -> tuple[bool, str]:
    reason = state.ctx.auto_reason
    return (True, f"automatic mail ({reason})") if reason else (False, "not automatic mail")


def _test_followup(state: _RouteState) -> tuple[bool, str]:
    ref = state.ctx.followup_ref
    return (True, f"follow-up of {ref}") if ref else (False, "not a follow-up")


_BOOL_TESTS: dict[str, Callable[[_RouteState], tuple[bool, str]]] = {
    "has_attachment": _test_has_attachment,
    "automatic": _test_automatic,
    "followup": _test_followup,
}

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
# The rule set
# --------------------------------------------------------------------------------------------


class RuleSet:
    """Loaded, checked rules; immutable, so a reload swaps one whole set for another."""

    def __init__(
        self,
        rules: Sequence[Rule],
        backends: Mapping[str, str],
        zone: ZoneInfo,
        pattern_sets: dict[str, _PatternSet],
        header_names: dict[str, str],
        files: Sequence[Path] = (),
    ) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.backends: dict[str, str] = dict(backends)
        self.zone = zone
        self.pattern_sets = pattern_sets
        self.header_names = header_names
        self.files: tuple[Path, ...] = tuple(files)
        self._by_name = {rule.name: rule for rule in self.rules}

    @property
    def rule_names(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self.rules)

    @property
    def backends_used(self) -> frozenset[str]:
        """The backends some rule names (a follow-up may still go to any configured backend)."""
        return frozenset(rule.backend for rule in self.rules if rule.backend)

    def rule(self, name: str) -> Rule | None:
        return self._by_name.get(name)

    def notice_for(self, decision: Decision) -> str | None:
        """The `notice` template of the suppress rule that made `decision`, else None.

        Never for automatic mail; rate limits are the sender's business (like acknowledgements).
        """
        if decision.action != "suppress" or decision.automatic:
            return None
        rule = self._by_name.get(decision.rule)
        return rule.notice if rule is not None and rule.action == "suppress" else None

    def route(self, mail: ParsedMail, env: Envelope, ctx: RouteContext) -> Decision:
        """Decide what happens to one mail. Pure; see the module docstring for the policy."""
        if ctx.loop_reason:
            return Decision(
                rule="",
                backend="",
                action="suppress",
                ack=None,
                automatic=True,
                reasons=(
                    f"loop: {ctx.loop_reason}",
                    "mail from one of our own addresses is always suppressed (no rule applies)",
                ),
            )
        state = _RouteState(self, mail, env, ctx)
        reasons: list[str] = []
        chain: list[Rule] = []
        decided = False
        for rule in self.rules:
            ok, why = rule.evaluate(state)  # only a matched rule sets state.matched_recipient
            if not ok:
                reasons.append(f"rule {rule.name!r} did not match: {why[0]}")
                continue
            reasons.append(f"rule {rule.name!r} matched: " + "; ".join(why))
            chain.append(rule)
            if not rule.continue_:
                decided = True
                break
        automatic = ctx.auto_reason is not None
        followup = ctx.followup_ref is not None
        if ctx.auto_reason:
            reasons.insert(0, f"automatic mail: {ctx.auto_reason}")
        if followup:
            reasons.insert(0, f"follow-up of ticket {ctx.followup_ref}")

        merged = _merge(chain)
        rule_name = chain[-1].name if chain else ""
        backend = merged.get("backend") or ""
        if not decided:
            reasons.append("no rule without continue = true matched")
            if not backend and not (followup and ctx.followup_backend):
                return Decision(
                    rule_name,
                    "",
                    "suppress",
                    ack=None,
                    automatic=automatic,
                    reasons=(*reasons, "suppressed: no backend chosen"),
                )

        if merged.get("action") == "suppress":
            reason = merged.get("reason")
            text = reason.expand(state) if isinstance(reason, _Template) else reason
            reasons.append(f"suppressed by rule {rule_name!r}: {text or 'no reason given'}")
            notice = chain[-1].notice if chain and chain[-1].action == "suppress" else None
            if notice and not automatic:
                reasons.append(f"notice template {notice!r} to the sender")
            return Decision(
                rule_name, "", "suppress", ack=None, automatic=automatic, reasons=tuple(reasons)
            )

        if automatic and not followup and not any(r.match_automatic is True for r in chain):
            reasons.append(
                "suppressed: automatic mail is not ticketed unless a matching rule says "
                "match.automatic = true"
            )
            return Decision("", "", "suppress", ack=None, automatic=True, reasons=tuple(reasons))

        if followup and ctx.followup_backend:
            backend = ctx.followup_backend
            reasons.append(f"follow-up goes to backend {backend!r}, where the ticket is")
        ticket = self._ticket(merged, backend, state, reasons)

        if followup:
            ack = None if automatic else merged.get("followup_ack")
            if automatic:
                reasons.append("no acknowledgement: automatic mail")
            return Decision(
                rule_name,
                backend,
                "followup",
                ticket=ticket,
                followup_of=ctx.followup_ref,
                ack=ack,
                automatic=automatic,
                reasons=tuple(reasons),
            )
        ack = merged.get("ack", "default")
        if automatic:
            ack = None
            reasons.append("no acknowledgement: automatic mail")
        return Decision(
            rule_name,
            backend,
            "new",
            ticket=ticket,
            ack=ack,
            automatic=automatic,
            reasons=tuple(reasons),
        )

    def _ticket(
        self,
        merged: dict[str, Any],
        backend: str,
        state: _RouteState,
        reasons: list[str],
    ) -> dict[str, Any]:
        """Expand the merged fields; drop those the final backend's type does not take."""
        backend_type = self.backends.get(backend)
        out: dict[str, Any] = {}
        for name, (value, source) in merged["fields"].items():
            expanded = _expand(value, state)
            if backend_type is not None:
                error = _field_error(backend_type, name, expanded)
                if error is not None:
                    reasons.append(
                        f"field {name!r} from rule {source!r} dropped for backend {backend!r}: "
                        f"{error}"
                    )
                    continue
            out[name] = expanded
        return out


def _merge(chain: list[Rule]) -> dict[str, Any]:
    """Fold the matched rules: keys a later rule set win, ticket tables merge key by key."""
    merged: dict[str, Any] = {"fields": {}}
    fields: dict[str, tuple[Any, str]] = merged["fields"]
    for rule in chain:
        for key in rule.set_keys:
            merged[key] = getattr(rule, key)
        if (
            rule.match_followup is True
            and "ack" in rule.set_keys
            and "followup_ack" not in rule.set_keys
        ):
            merged["followup_ack"] = rule.ack  # a rule written for follow-ups: its ack is theirs
        for name, value in rule.fields.items():
            old = fields.get(name)
            if isinstance(value, dict) and old is not None and isinstance(old[0], dict):
                fields[name] = ({**old[0], **value}, rule.name)
            else:
                fields[name] = (value, rule.name)
    return merged


def _expand(value: FieldValue, state: _RouteState) -> Any:
    if isinstance(value, _Template):
        return value.expand(state)
    if isinstance(value, dict):
        return {k: _expand(v, state) for k, v in value.items()}
    return value


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
