"""Property tests (hypothesis) for the rule matcher: exact vs glob vs regex, case folding, lists."""

from __future__ import annotations

import json
import re
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.models import Envelope, ParsedMail
from gateway.rules import RouteContext, RuleSet, load_rules

BACKENDS = {"whmcs": "whmcs"}
CTX = RouteContext(now=datetime(2026, 11, 23, 12, 0, tzinfo=UTC))

# Text that TOML basic strings can carry (no control characters except newline and tab).
TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc"), max_codepoint=0x2FF)
    | st.sampled_from("\n\t"),
    max_size=20,
)
SMALL = st.text(alphabet="aAbB.\n", max_size=8)
GLOB = st.text(alphabet="aAbB.*?[", max_size=8)
LOCAL = st.text(alphabet="abcdefxyz0189._-+", min_size=1, max_size=10)
DOMAIN = st.from_regex(r"[a-z0-9]{1,8}(\.[a-z]{2,4}){1,2}", fullmatch=True)


def toml(value: object) -> str:
    """A Python value as TOML (strings via JSON escapes, which TOML shares)."""
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def ruleset(condition: str, value: object) -> RuleSet:
    text = (
        f'[[rule]]\nname = "hit"\nbackend = "whmcs"\n[rule.match]\n{condition} = {toml(value)}\n'
        '\n[[rule]]\nname = "default"\nbackend = "whmcs"\n'
    )
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "r.toml").write_text(text, encoding="utf-8")
        return load_rules(Path(tmp), BACKENDS)


def hits(rs: RuleSet, mail: ParsedMail, env: Envelope | None = None) -> bool:
    return rs.route(mail, env or Envelope("", ()), CTX).rule == "hit"


def glob_reference(glob: str, text: str, *, fold: bool) -> bool:
    """Globs as documented: * and ? wild (newlines included), everything else literal."""
    pattern = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in glob)
    flags = re.DOTALL | (re.IGNORECASE if fold else 0)
    return re.fullmatch(pattern, text, flags) is not None


@settings(max_examples=150, deadline=None)
@given(value=TEXT, subject=TEXT)
def test_exact_is_whole_string_equality(value: str, subject: str) -> None:
    rs = ruleset("subject", {"exact": value})
    assert hits(rs, ParsedMail(subject=subject)) == (subject == value)
    assert hits(rs, ParsedMail(subject=value))


@settings(max_examples=150, deadline=None)
@given(glob=GLOB, subject=SMALL)
def test_glob_on_text_is_case_sensitive_whole_match(glob: str, subject: str) -> None:
    rs = ruleset("subject", {"glob": glob})
    assert hits(rs, ParsedMail(subject=subject)) == glob_reference(glob, subject, fold=False)


@settings(max_examples=150, deadline=None)
@given(value=st.text(alphabet="aAbB.*?", max_size=8), subject=SMALL)
def test_plain_string_is_glob_iff_it_has_wildcards(value: str, subject: str) -> None:
    rs = ruleset("subject", value)
    if "*" in value or "?" in value:
        expected = glob_reference(value, subject, fold=False)
    else:
        expected = subject == value
    assert hits(rs, ParsedMail(subject=subject)) == expected


@settings(max_examples=150, deadline=None)
@given(glob=GLOB, local=st.text(alphabet="aAbB.", min_size=1, max_size=6))
def test_glob_on_addresses_folds_case(glob: str, local: str) -> None:
    address = f"{local}@x.org"
    rs = ruleset("sender", {"glob": glob + "@x.org"})
    expected = glob_reference(glob + "@x.org", address, fold=True)
    assert hits(rs, ParsedMail(from_addr=address.lower())) == expected


@settings(max_examples=100, deadline=None)
@given(local=LOCAL, domain=DOMAIN, flips=st.lists(st.booleans(), min_size=30, max_size=30))
def test_addresses_match_whatever_the_case(local: str, domain: str, flips: list[bool]) -> None:
    address = f"{local}@{domain}"
    shouted = "".join(c.upper() if f else c for c, f in zip(address, flips * 3, strict=False))
    mail = ParsedMail(from_addr=address, to=("support@example.com",))
    for condition, value in (
        ("sender", shouted),
        ("sender", {"regex": "^" + re.escape(shouted) + "$"}),
        ("sender", shouted[:-1] + "?"),
        ("sender_domain", shouted.rpartition("@")[2]),
    ):
        assert hits(ruleset(condition, value), mail), (condition, value)
    # the recipient side: envelope addresses as the MTA wrote them
    rs = ruleset("recipient", address)
    assert hits(rs, ParsedMail(), Envelope("", (shouted,)))


# A small regex grammar on which Python's re and RE2 agree.
ATOM = st.sampled_from(["a", "b", "A", ".", "[ab]", "[^a]", "\\.", "(?i:a)"])


@st.composite
def regexes(draw: st.DrawFn, depth: int = 0) -> str:
    parts = draw(st.lists(ATOM, min_size=1, max_size=3))
    out = ""
    for part in parts:
        if depth < 2 and draw(st.booleans()):
            part = "(" + draw(regexes(depth + 1)) + ")"
        out += part + draw(st.sampled_from(["", "*", "+", "?", "{1,2}"]))
    if draw(st.booleans()):
        out += "|" + draw(st.sampled_from(["a", "b$", "^A"]))
    return out


@settings(max_examples=200, deadline=None)
@given(pattern=regexes(), subject=st.text(alphabet="aAb.", max_size=10))
def test_regex_is_a_search_with_re_semantics(pattern: str, subject: str) -> None:
    rs = ruleset("subject", {"regex": pattern})
    expected = re.search(pattern, subject) is not None
    assert hits(rs, ParsedMail(subject=subject)) == expected


@settings(max_examples=100, deadline=None)
@given(
    values=st.lists(st.text(alphabet="ab*?", min_size=1, max_size=4), min_size=1, max_size=4),
    subject=st.text(alphabet="ab", max_size=5),
)
def test_list_is_any_and_not_is_none(values: list[str], subject: str) -> None:
    mail = ParsedMail(subject=subject)
    each = [hits(ruleset("subject", v), mail) for v in values]
    assert hits(ruleset("subject", values), mail) == any(each)
    assert hits(ruleset("subject", {"not": values}), mail) == (not any(each))


@settings(max_examples=100, deadline=None)
@given(
    recipients=st.lists(st.sampled_from(["a@x.org", "b@x.org", "c@y.org"]), max_size=3),
    value=st.sampled_from(["a@x.org", "*@x.org", "c@*", "?@y.org"]),
)
def test_multi_valued_fact_matches_if_any_item_does(recipients: list[str], value: str) -> None:
    mail = ParsedMail(to=tuple(recipients))
    rs = ruleset("recipient", value)
    expected = any(glob_reference(value, r, fold=True) for r in recipients)
    assert hits(rs, mail) == expected
    assert hits(ruleset("recipient", {"not": value}), mail) == (not expected)
