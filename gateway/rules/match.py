"""Matching: RE2 pattern sets and value matchers, what one route call knows about the mail
(`_RouteState`), the [rule.match] conditions, placeholders, and the compiled `Rule`."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import re2

if TYPE_CHECKING:
    from gateway.rules.policy import RouteContext, RuleSet
from gateway.models import Envelope, ParsedMail

BODY_LIMIT = 1 << 20  # characters of the body examined by `body` conditions
REGEX_MAX_MEM = 8 << 20  # RE2 memory bound of one compiled regex or glob
SET_MAX_MEM = 64 << 20  # RE2 memory bound of one combined pattern set (one per mail property)

RuleAction = Literal["ticket", "suppress"]


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
