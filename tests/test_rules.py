"""Tests for gateway.rules: problems at file:line, matching, continue, policy, placeholders."""

from __future__ import annotations

import re
import textwrap
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from gateway.errors import ConfigError, Problem
from gateway.models import Attachment, Envelope, ParsedMail
from gateway.rules import BODY_LIMIT, NO_CATCH_ALL, RouteContext, RuleSet, load_rules

BACKENDS = {
    "soap": "superoffice-soap",
    "rest": "superoffice-rest",
    "isv": "interserver",
    "whmcs": "whmcs",
}
CATCH_ALL = """
[[rule]]
name = "default"
backend = "soap"
"""
NOW = datetime(2026, 11, 23, 10, 30, tzinfo=UTC)  # a Monday
REPO_RULES = Path(__file__).resolve().parent.parent / "rules"


def write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def rules(tmp_path: Path, text: str, *, catch_all: bool = True, **kw: Any) -> RuleSet:
    d = tmp_path / "rules"
    write(d, "10-test.toml", text)
    if catch_all:
        write(d, "99-default.toml", CATCH_ALL)
    return load_rules(d, BACKENDS, **kw)


def problems(tmp_path: Path, text: str, *, catch_all: bool = True, **kw: Any) -> list[Problem]:
    with pytest.raises(ConfigError) as err:
        rules(tmp_path, text, catch_all=catch_all, **kw)
    return err.value.problems


def one_problem(tmp_path: Path, text: str, **kw: Any) -> Problem:
    found = problems(tmp_path, text, **kw)
    assert len(found) == 1, found
    assert found[0].file == str(tmp_path / "rules" / "10-test.toml")
    return found[0]


def mail(**kw: Any) -> ParsedMail:
    kw.setdefault("from_addr", "alice@customer.example")
    kw.setdefault("from_name", "Alice Example")
    kw.setdefault("to", ("support@example.com",))
    kw.setdefault("subject", "Hello")
    kw.setdefault("text", "Please help.")
    kw.setdefault("size", 2000)
    return ParsedMail(**kw)


def env(*rcpt: str, intake: str = "smtp", mail_from: str = "alice@customer.example") -> Envelope:
    return Envelope(mail_from=mail_from, rcpt_tos=rcpt, intake=intake)


def ctx(**kw: Any) -> RouteContext:
    kw.setdefault("now", NOW)
    return RouteContext(**kw)


def route(rs: RuleSet, m: ParsedMail | None = None, e: Envelope | None = None, **kw: Any) -> Any:
    return rs.route(m or mail(), e or env(), ctx(**kw))


# --------------------------------------------------------------------------------------------
# Load-time problems, each with its file and line
# --------------------------------------------------------------------------------------------


def test_toml_syntax_error(tmp_path: Path) -> None:
    p = one_problem(tmp_path, '[[rule]]\nname = "a"\nbackend = soap\n')
    assert p.line == 3 and "TOML syntax" in p.message


def test_unknown_key_in_rule_and_file(tmp_path: Path) -> None:
    text = """
    [[rule]]
    name = "a"
    bakend = "soap"
    [rule.match]
    subject = "x"

    [settings]
    x = 1
    """
    found = problems(tmp_path, text)
    assert [(p.line, p.message) for p in found] == [
        (7, "settings: unknown key (a rule file holds [[rule]] tables only)"),
        (3, "rule[0].bakend: unknown key"),
    ]


def test_wrong_type(tmp_path: Path) -> None:
    p = one_problem(tmp_path, '[[rule]]\nname = "a"\n\ncontinue = "yes"\n[rule.match]\nto = "x"\n')
    assert p.line == 4 and p.message.startswith("rule[0].continue:")


def test_duplicate_rule_name_across_files(tmp_path: Path) -> None:
    d = tmp_path / "rules"
    write(d, "10-a.toml", '[[rule]]\nname = "x"\nbackend = "soap"\n[rule.match]\nto = "a@b"\n')
    write(
        d,
        "20-b.toml",
        '# c\n\n[[rule]]\nname = "x"\nbackend = "soap"\nmatch.to = "b"\n' + CATCH_ALL,
    )
    with pytest.raises(ConfigError) as err:
        load_rules(d, BACKENDS)
    (p,) = err.value.problems
    assert (p.file, p.line) == (str(d / "20-b.toml"), 3)
    assert "duplicate rule name 'x'" in p.message and "10-a.toml:1" in p.message


def test_unknown_backend(tmp_path: Path) -> None:
    p = one_problem(tmp_path, '[[rule]]\nname = "a"\n\nbackend = "nope"\n[rule.match]\nto = "x"\n')
    assert p.line == 4
    assert "unknown backend 'nope' (configured: isv, rest, soap, whmcs)" in p.message


@pytest.mark.parametrize(
    ("backend", "ticket", "expected"),
    [
        ("soap", "deptid = 2", "'deptid' is not a superoffice-soap field"),
        ("soap", "priority = 0", "-1 (let SuperOffice decide)"),
        ("soap", 'priority = "High"', "priority id"),
        ("soap", 'slevel = "public"', '"external", "internal"'),
        ("soap", 'extra = { y_1 = "a" }', "key 'y_1' is not x_N"),
        ("soap", "extra = { x_1 = 3 }", "must be a string"),
        ("rest", 'person = "find"', '"lookup"'),
        ("rest", 'notify = "yes"', "true or false"),
        ("isv", "product = 3", "must be a string"),
        ("whmcs", 'priority = "Urgent"', '"Low", "Medium" or "High"'),
        ("whmcs", "deptid = 0", "an id"),
        ("whmcs", "customfields = { abc = 'x' }", "key 'abc' is not id"),
        ("whmcs", "noemail = 1", "true or false"),
    ],
)
def test_ticket_fields_checked_per_backend_type(
    tmp_path: Path, backend: str, ticket: str, expected: str
) -> None:
    head = f'[[rule]]\nname = "a"\nbackend = "{backend}"\n[rule.match]\nto = "x"\n'
    text = f"{head}[rule.ticket]\n{ticket}\n"
    p = one_problem(tmp_path, text)
    assert p.line == 7 and expected in p.message, p


def test_field_without_backend_must_exist_in_some_configured_type(tmp_path: Path) -> None:
    text = """
    [[rule]]
    name = "a"
    continue = true
    [rule.ticket]
    deptid = 3
    """
    d = tmp_path / "rules"
    write(d, "10-test.toml", text)
    write(d, "99-default.toml", CATCH_ALL)
    with pytest.raises(ConfigError) as err:
        load_rules(d, {"soap": "superoffice-soap"})
    (p,) = err.value.problems
    assert p.line == 5 and "not a field of any configured backend type" in p.message
    # with a whmcs backend configured, the same rule is fine
    assert load_rules(d, BACKENDS).rule_names == ("a", "default")
    # the value must suit at least one type that has the field
    write(d, "10-test.toml", text.replace("deptid = 3", 'priority = "Soon"'))
    with pytest.raises(ConfigError) as err:
        load_rules(d, BACKENDS)
    assert "superoffice-soap:" in err.value.problems[0].message


def test_unknown_placeholder_in_field_and_reason(tmp_path: Path) -> None:
    text = """
    [[rule]]
    name = "a"
    action = "suppress"
    reason = "from {sendr}"
    [rule.match]
    to = "x"

    [[rule]]
    name = "b"
    backend = "isv"
    [rule.match]
    to = "y"
    [rule.ticket]
    product = "{header:} {x"
    """
    found = problems(tmp_path, text)
    assert [p.line for p in found] == [4, 14, 14]
    assert "unknown placeholder {sendr}" in found[0].message
    assert "unknown placeholder {header:}" in found[1].message
    assert "unbalanced '{'" in found[2].message


def test_invalid_regex(tmp_path: Path) -> None:
    text = '[[rule]]\nname = "a"\nbackend = "soap"\n[rule.match]\nsubject = "x"\n'
    text += 'body = { regex = "(?<=a)b" }\n'
    p = one_problem(tmp_path, text)
    assert p.line == 6 and "invalid regex '(?<=a)b' (RE2 syntax)" in p.message


def test_invalid_regex_inside_a_list(tmp_path: Path) -> None:
    text = (
        '[[rule]]\nname = "a"\nbackend = "soap"\n[rule.match]\n'
        'sender = [\n  "a@b",\n  { regex = "(" },\n]\n'
    )
    p = one_problem(tmp_path, text)
    assert p.line == 7 and "missing )" in p.message


def test_unknown_template_and_intake(tmp_path: Path) -> None:
    text = """
    [[rule]]
    name = "a"
    backend = "soap"
    ack = "welcome"
    [rule.match]
    intake = ["smtp", "support-box"]
    """
    found = problems(tmp_path, text, templates={"default"}, intakes={"smtp", "Sales-Box"})
    assert [(p.line, p.message.split(":")[0]) for p in found] == [
        (6, "rule[0].match.intake"),
        (4, "rule[0].ack"),
    ]
    assert "unknown intake 'support-box' (known: Sales-Box, smtp)" in found[0].message
    assert "unknown template 'welcome' (known: default)" in found[1].message
    # not checked when the names are not given
    assert rules(tmp_path, text).rule_names == ("a", "default")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('time = "8-17"', "bad time window"),
        ('time = "08:00-25:00"', "hours run 00-23"),
        ('time = "09:00-09:00"', "empty time window"),
        ('time = ["08:00-12:00", 13]', "bad time window 13"),
        ('weekday = ["mon", "funday"]', "bad weekday 'funday'"),
        ("weekday = []", "an empty list never matches"),
        ("size_max = -1", "size in bytes"),
        ("has_attachment = 1", "true or false"),
        ('subject = { regx = "a" }', "a table value must be one of"),
        ("subject = []", "an empty list never matches"),
        ('colour = "red"', "unknown condition 'colour'"),
        ('header = "X-Spam"', 'header."Name" = value'),
    ],
)
def test_bad_conditions(tmp_path: Path, value: str, expected: str) -> None:
    text = f'[[rule]]\nname = "a"\nbackend = "soap"\n[rule.match]\nto = "x"\n{value}\n'
    p = one_problem(tmp_path, text)
    assert p.line == 6 and expected in p.message, p


def test_no_catch_all(tmp_path: Path) -> None:
    text = '[[rule]]\nname = "a"\nbackend = "soap"\n[rule.match]\nto = "x"\n'
    found = problems(tmp_path, text, catch_all=False)
    assert [(Path(p.file).name, p.line, p.message) for p in found] == [
        ("10-test.toml", 1, NO_CATCH_ALL)
    ]
    # a rule without conditions but with continue = true is no catch-all
    text += '\n[[rule]]\nname = "b"\ncontinue = true\n'
    assert problems(tmp_path, text, catch_all=False)[0].message == NO_CATCH_ALL
    # an empty [rule.match] table matches everything too
    text += '\n[[rule]]\nname = "c"\nbackend = "soap"\n[rule.match]\n'
    assert rules(tmp_path, text, catch_all=False).rule_names == ("a", "b", "c")


def test_empty_rules_directory(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    with pytest.raises(ConfigError) as err:
        load_rules(tmp_path / "rules", BACKENDS)
    assert [p.message for p in err.value.problems] == [NO_CATCH_ALL]


def test_rule_after_catch_all_can_never_match(tmp_path: Path) -> None:
    d = tmp_path / "rules"
    write(d, "10-test.toml", CATCH_ALL + '\n[[rule]]\nname = "late"\nbackend = "soap"\n')
    with pytest.raises(ConfigError) as err:
        load_rules(d, BACKENDS)
    (p,) = err.value.problems
    assert p.line == 5 and "rule 'late' can never match: catch-all rule 'default'" in p.message


def test_catch_all_needs_backend_and_tickets(tmp_path: Path) -> None:
    p = one_problem(tmp_path, '[[rule]]\nname = "all"\nack = false\n', catch_all=False)
    assert p.line == 1 and "needs a backend" in p.message
    p = one_problem(tmp_path, '[[rule]]\nname = "all"\naction = "suppress"\n', catch_all=False)
    assert "suppresses all other mail" in p.message


def test_reason_only_for_suppress(tmp_path: Path) -> None:
    text = '[[rule]]\nname = "a"\nbackend = "soap"\nreason = "x"\n[rule.match]\nto = "x"\n'
    p = one_problem(tmp_path, text)
    assert p.line == 4 and 'only to action = "suppress"' in p.message


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    d = tmp_path / "rules"
    write(
        d,
        "10-a.toml",
        '[[rule]]\nname = "a"\nbackend = "nope"\n[rule.match]\nsubject = {regex="("}\n',
    )
    write(d, "20-b.toml", "[[rule]\n")
    write(d, "30-c.toml", '[[rule]]\nname = "c"\nbackend = "soap"\n[rule.ticket]\ncolor = 1\n')
    with pytest.raises(ConfigError) as err:
        load_rules(d, BACKENDS)
    where = [(Path(p.file).name, p.line) for p in err.value.problems]
    assert where == [("10-a.toml", 5), ("10-a.toml", 3), ("20-b.toml", 1), ("30-c.toml", 5)]
    text = str(err.value)
    # a broken catch-all is reported as broken, not as missing
    assert NO_CATCH_ALL not in text
    assert re.search(r"10-a\.toml:3: rule\[0\]\.backend: unknown backend", text)


def test_unknown_time_zone(tmp_path: Path) -> None:
    found = problems(tmp_path, CATCH_ALL, catch_all=False, timezone="Mars/Olympus")
    assert found[0].message == "unknown time zone 'Mars/Olympus'"


# --------------------------------------------------------------------------------------------
# Matching
# --------------------------------------------------------------------------------------------


def single(tmp_path: Path, match: str, **kw: Any) -> RuleSet:
    return rules(
        tmp_path, f'[[rule]]\nname = "hit"\nbackend = "whmcs"\n[rule.match]\n{match}\n', **kw
    )


def hits(rs: RuleSet, m: ParsedMail | None = None, e: Envelope | None = None, **kw: Any) -> bool:
    return bool(route(rs, m, e, **kw).rule == "hit")


def test_recipient_is_envelope_and_to_cc(tmp_path: Path) -> None:
    rs = single(tmp_path, 'recipient = "billing@example.com"')
    assert hits(rs, mail(to=("billing@example.com",)))
    assert hits(rs, mail(to=("x@y.z",), cc=("billing@example.com",)))
    assert hits(rs, mail(to=("x@y.z",)), env("Billing@Example.COM"))
    assert not hits(rs, mail(to=("x@y.z",)), env("support@example.com"))
    rs = single(tmp_path, 'envelope_recipient = "billing@example.com"')
    assert not hits(rs, mail(to=("billing@example.com",)))
    assert hits(rs, mail(), env("billing@example.com"))
    rs = single(tmp_path, 'cc = "billing@example.com"')
    assert not hits(rs, mail(to=("billing@example.com",)))
    assert hits(rs, mail(cc=("billing@example.com",)))


def test_addresses_fold_case_in_every_form(tmp_path: Path) -> None:
    m = mail(from_addr="bob@vip.example.org")
    for match in (
        'sender = "BOB@VIP.example.org"',
        'sender = "*@VIP.EXAMPLE.ORG"',
        'sender = { regex = "^bob@VIP" }',
        'sender_domain = "Vip.Example.Org"',
        'sender_domain = { glob = "VIP.*" }',
    ):
        assert hits(single(tmp_path, match), m), match


def test_sender_falls_back_to_envelope_sender(tmp_path: Path) -> None:
    rs = single(tmp_path, 'sender = "mta@relay.example"')
    assert hits(rs, mail(from_addr=""), env(mail_from="MTA@relay.example"))


def test_text_is_case_sensitive_except_regex_flags(tmp_path: Path) -> None:
    m = mail(subject="Invoice 42")
    assert hits(single(tmp_path, 'subject = "Invoice 42"'), m)
    assert not hits(single(tmp_path, 'subject = "invoice 42"'), m)
    assert not hits(single(tmp_path, 'subject = "invoice*"'), m)
    assert hits(single(tmp_path, 'subject = "Invoice*"'), m)
    assert not hits(single(tmp_path, 'subject = { regex = "invoice" }'), m)
    assert hits(single(tmp_path, 'subject = { regex = "(?i)invoice" }'), m)
    # regex is a search, exact and glob are whole-value
    assert hits(single(tmp_path, 'subject = { regex = "ce 4" }'), m)
    assert not hits(single(tmp_path, 'subject = "Invoice"'), m)


def test_exact_table_keeps_wildcards_literal(tmp_path: Path) -> None:
    rs = single(tmp_path, 'subject = { exact = "Why?" }')
    assert hits(rs, mail(subject="Why?"))
    assert not hits(rs, mail(subject="Why!"))
    assert hits(single(tmp_path, 'subject = "Why?"'), mail(subject="Why!"))


def test_glob_star_spans_lines_and_brackets_are_literal(tmp_path: Path) -> None:
    assert hits(single(tmp_path, 'body = "*urgent*"'), mail(text="line one\nthis is urgent\nbye"))
    assert hits(single(tmp_path, 'subject = "[x]*"'), mail(subject="[x] hello"))
    assert not hits(single(tmp_path, 'subject = "[x]*"'), mail(subject="x hello"))


def test_list_means_any_and_not_means_none(tmp_path: Path) -> None:
    rs = single(tmp_path, 'recipient = ["a@example.com", "*@billing.example.com"]')
    assert hits(rs, mail(to=("x@billing.example.com",)))
    assert not hits(rs, mail(to=("x@example.com",)))
    rs = single(tmp_path, 'recipient = { not = "spam@example.com" }')
    assert hits(rs, mail(to=("a@example.com",)))
    assert not hits(rs, mail(to=("a@example.com",), cc=("spam@example.com",)))


def test_header_conditions(tmp_path: Path) -> None:
    m = mail(headers=(("X-Priority", "3"), ("x-priority", "1 (Highest)")))
    assert hits(single(tmp_path, 'header."X-Priority" = "1*"'), m)
    assert hits(single(tmp_path, 'header.x-PRIORITY = "3"'), m)
    assert not hits(single(tmp_path, 'header."X-Priority" = "2*"'), m)
    absent = single(tmp_path, 'header."List-Id" = { not = "*" }')
    assert hits(absent, m)
    assert not hits(absent, mail(headers=(("List-Id", "<x.example>"),)))
    assert not hits(single(tmp_path, 'header."List-Id" = "*"'), m)


def test_body_condition_and_limit(tmp_path: Path) -> None:
    rs = single(tmp_path, 'body = { regex = "order #\\\\d+" }')
    assert hits(rs, mail(text="hello, about order #123 please"))
    late = "x" * BODY_LIMIT + " order #5"
    assert not hits(rs, mail(text=late))  # only the first BODY_LIMIT characters are read


def test_attachments(tmp_path: Path) -> None:
    pdf = Attachment("Invoice.PDF", "application/pdf", b"%PDF")
    logo = Attachment("logo.png", "image/png", b"png", inline=True)
    assert hits(single(tmp_path, 'attachment = "*.pdf"'), mail(attachments=(logo, pdf)))
    assert not hits(single(tmp_path, 'attachment = "*.png"'), mail(attachments=(logo, pdf)))
    rs = single(tmp_path, "has_attachment = true")
    assert hits(rs, mail(attachments=(pdf,)))
    assert not hits(rs, mail(attachments=(logo,)))
    assert hits(single(tmp_path, "has_attachment = false"), mail())


def test_size_and_intake(tmp_path: Path) -> None:
    rs = single(tmp_path, 'size_min = "1k"\nsize_max = 4096')
    assert hits(rs, mail(size=1024)) and hits(rs, mail(size=4096))
    assert not hits(rs, mail(size=1023)) and not hits(rs, mail(size=4097))
    rs = single(tmp_path, 'intake = "Support-Box"', intakes={"smtp", "support-box"})
    assert hits(rs, mail(), env(intake="support-box"))
    assert not hits(rs, mail(), env(intake="smtp"))


def test_conditions_all_must_hold(tmp_path: Path) -> None:
    rs = single(tmp_path, 'recipient = "billing@example.com"\nsubject = { regex = "(?i)refund" }')
    assert hits(rs, mail(to=("billing@example.com",), subject="Refund please"))
    assert not hits(rs, mail(to=("billing@example.com",), subject="Hello"))
    assert not hits(rs, mail(to=("sales@example.com",), subject="Refund"))


def test_reasons_explain_each_rule_tried(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        """
        [[rule]]
        name = "sales"
        backend = "rest"
        [rule.match]
        recipient = "sales@example.com"

        [[rule]]
        name = "billing"
        backend = "whmcs"
        [rule.match]
        recipient = "billing@example.com"
        subject = { regex = "(?i)invoice" }
        """,
    )
    d = route(rs, mail(to=("billing@example.com",), subject="Invoice 7"))
    assert d.reasons == (
        "rule 'sales' did not match: recipient billing@example.com did not match "
        "'sales@example.com'",
        "rule 'billing' matched: recipient billing@example.com matched 'billing@example.com'; "
        "subject 'Invoice 7' matched regex '(?i)invoice'",
    )
    assert d.to_json()["rule"] == "billing" and d.to_json()["ack"] is True


def test_body_text_is_never_quoted_in_reasons(tmp_path: Path) -> None:
    rs = single(tmp_path, 'body = "*secret*"')
    d = route(rs, mail(text="my secret password"))
    assert d.rule == "hit" and "password" not in " ".join(d.reasons)


# --------------------------------------------------------------------------------------------
# continue
# --------------------------------------------------------------------------------------------

CONTINUE_RULES = """
[[rule]]
name = "tag-vip"
continue = true
[rule.match]
sender_domain = "vip.example.org"
[rule.ticket]
priority = 3
extra = { x_2 = "vip" }

[[rule]]
name = "rest-for-sales"
backend = "rest"
continue = true
[rule.match]
recipient = "sales@example.com"

[[rule]]
name = "support"
backend = "soap"
[rule.match]
recipient = ["support@example.com", "sales@example.com"]
[rule.ticket]
category = 4
extra = { x_1 = "{sender}" }

[[rule]]
name = "never-reached"
backend = "whmcs"
[rule.match]
recipient = "support@example.com"
"""


def test_continue_adds_fields_later_backend_overrides(tmp_path: Path) -> None:
    rs = rules(tmp_path, CONTINUE_RULES)
    d = route(rs, mail(from_addr="bob@vip.example.org"))
    assert (d.rule, d.backend) == ("support", "soap")
    assert d.ticket == {
        "priority": 3,
        "category": 4,
        "extra": {"x_2": "vip", "x_1": "bob@vip.example.org"},
    }
    assert [r.split(":")[0] for r in d.reasons] == [
        "rule 'tag-vip' matched",
        "rule 'rest-for-sales' did not match",
        "rule 'support' matched",
    ]


def test_continue_backend_not_overridden_by_rule_without_backend(tmp_path: Path) -> None:
    text = CONTINUE_RULES.replace('name = "support"\nbackend = "soap"', 'name = "support"')
    rs = rules(tmp_path, text)
    d = route(rs, mail(to=("sales@example.com",), from_addr="bob@vip.example.org"))
    assert (d.rule, d.backend) == ("support", "rest")
    # extra is not a superoffice-rest field: dropped, and the reasons say so
    assert d.ticket == {"priority": 3, "category": 4}
    assert any("field 'extra' from rule 'support' dropped" in r for r in d.reasons)


def test_first_match_wins_without_continue(tmp_path: Path) -> None:
    rs = rules(tmp_path, CONTINUE_RULES)
    d = route(rs, mail(to=("support@example.com",)))
    assert d.rule == "support" and "never-reached" not in " ".join(d.reasons)


# --------------------------------------------------------------------------------------------
# Policy: loops, automatic mail, follow-ups, suppress
# --------------------------------------------------------------------------------------------

POLICY_RULES = """
[[rule]]
name = "bounces"
backend = "whmcs"
ack = "default"
[rule.match]
automatic = true
recipient = "billing@example.com"

[[rule]]
name = "newsletters"
action = "suppress"
reason = "newsletter from {sender_domain}"
notice = "suppressed"
[rule.match]
header."List-Unsubscribe" = "*"

[[rule]]
name = "replies"
backend = "rest"
ack = "reply-received"
continue = true
[rule.match]
followup = true
recipient = "sales@example.com"

[[rule]]
name = "support"
backend = "soap"
[rule.match]
recipient = ["support@example.com", "sales@example.com"]
[rule.ticket]
category = 2
"""


def test_loop_is_suppressed_whatever_the_rules(tmp_path: Path) -> None:
    rs = rules(tmp_path, POLICY_RULES)
    d = route(rs, loop_reason="from our own address support@example.com", followup_ref="7")
    assert (d.action, d.backend, d.ack, d.automatic) == ("suppress", "", None, True)
    assert "loop" in d.reasons[0]


def test_automatic_mail_is_suppressed_by_default(tmp_path: Path) -> None:
    rs = rules(tmp_path, POLICY_RULES)
    d = route(rs, auto_reason="Auto-Submitted: auto-replied")
    assert (d.action, d.backend, d.ack, d.automatic) == ("suppress", "", None, True)
    assert d.reasons[0] == "automatic mail: Auto-Submitted: auto-replied"
    assert "match.automatic = true" in d.reasons[-1]


def test_rule_can_take_automatic_mail_but_never_acks(tmp_path: Path) -> None:
    rs = rules(tmp_path, POLICY_RULES)
    d = route(rs, mail(to=("billing@example.com",)), auto_reason="null sender")
    assert (d.rule, d.action, d.backend, d.ack, d.automatic) == (
        "bounces", "new", "whmcs", None, True,
    )  # fmt: skip
    # the same rule does not match mail that is not automatic
    assert route(rs, mail(to=("billing@example.com",))).rule == "default"


def test_followup_goes_to_the_ticket_backend_without_ack(tmp_path: Path) -> None:
    rs = rules(tmp_path, POLICY_RULES)
    d = route(rs, followup_ref="1234", followup_backend="isv")
    assert (d.rule, d.action, d.backend, d.followup_of, d.ack) == (
        "support", "followup", "isv", "1234", None,
    )  # fmt: skip
    assert d.ticket == {}  # category is not an interserver field
    # unknown backend of the ticket: the rules' backend
    d = route(rs, followup_ref="1234")
    assert (d.backend, d.ticket) == ("soap", {"category": 2})


def test_followup_ack_from_a_followup_rule(tmp_path: Path) -> None:
    rs = rules(tmp_path, POLICY_RULES)
    d = route(rs, mail(to=("sales@example.com",)), followup_ref="9")
    assert (d.action, d.backend, d.ack) == ("followup", "soap", "reply-received")
    d = route(rs, mail(to=("sales@example.com",)), followup_ref="9", auto_reason="Precedence: bulk")
    assert (d.action, d.ack, d.automatic) == ("followup", None, True)


def test_followup_ack_key(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        '[[rule]]\nname = "all"\nbackend = "soap"\nfollowup_ack = "followup"\n',
        catch_all=False,
    )
    assert route(rs, followup_ref="5").ack == "followup"
    assert route(rs).ack == "default"


def test_automatic_followup_is_added_marked_automatic(tmp_path: Path) -> None:
    rs = rules(tmp_path, POLICY_RULES)
    d = route(rs, auto_reason="X-Autoreply", followup_ref="77", followup_backend="whmcs")
    assert (d.action, d.backend, d.followup_of, d.ack, d.automatic) == (
        "followup", "whmcs", "77", None, True,
    )  # fmt: skip
    # no rule lets automatic mail become a ticket: if the ticket is gone, the worker suppresses it
    assert d.automatic_ticketed is False
    allowing = rules(
        tmp_path, '[[rule]]\nname = "all"\nbackend = "soap"\n[rule.match]\nautomatic = true\n'
    )
    d = route(allowing, auto_reason="X-Autoreply", followup_ref="77")
    assert (d.action, d.automatic, d.automatic_ticketed) == ("followup", True, True)


def test_suppress_rule(tmp_path: Path) -> None:
    rs = rules(tmp_path, POLICY_RULES)
    m = mail(from_addr="news@shop.example", headers=(("List-Unsubscribe", "<mailto:u@x>"),))
    d = route(rs, m)
    assert (d.rule, d.action, d.backend, d.ack, d.ticket) == (
        "newsletters",
        "suppress",
        "",
        None,
        {},
    )
    assert "suppressed by rule 'newsletters': newsletter from shop.example" in d.reasons
    assert rs.notice_for(d) == "suppressed"
    assert d.to_json()["ack"] is False
    # a suppress rule applies to follow-ups too
    assert route(rs, m, followup_ref="3").action == "suppress"


def test_ack_false(tmp_path: Path) -> None:
    rs = rules(tmp_path, '[[rule]]\nname = "all"\nbackend = "soap"\nack = false\n', catch_all=False)
    d = route(rs)
    assert d.ack is None and d.to_json()["ack"] is False


def test_route_context_needs_aware_time() -> None:
    with pytest.raises(ValueError):
        RouteContext(now=datetime(2026, 1, 1))


# --------------------------------------------------------------------------------------------
# Placeholders
# --------------------------------------------------------------------------------------------


def test_placeholders_expand_at_route_time(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        """
        [[rule]]
        name = "billing"
        backend = "whmcs"
        [rule.match]
        recipient = "billing@example.com"
        [rule.ticket]
        [rule.ticket.customfields]
        1 = "{sender_name} <{sender}> @ {sender_domain}"
        2 = "{recipient}"
        3 = "{subject} | {date}"
        4 = "[{header:X-Customer}] [{header:X-Missing}]"
        5 = "{{literal}}"
        """,
    )
    m = mail(
        to=("support@example.com",),
        cc=("billing@example.com",),
        subject="Line\r\nbreak",
        date="Mon, 23 Nov 2026 10:00:00 +0000",
        headers=(("X-Customer", "C-42"),),
    )
    d = route(rs, m, env("support@example.com", "billing@example.com"))
    assert d.ticket["customfields"] == {
        "1": "Alice Example <alice@customer.example> @ customer.example",
        "2": "billing@example.com",  # the recipient the rule matched, not the first one
        "3": "Line break | Mon, 23 Nov 2026 10:00:00 +0000",
        "4": "[C-42] []",
        "5": "{literal}",
    }


def test_recipient_placeholder_defaults_to_first_recipient(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        '[[rule]]\nname = "all"\nbackend = "isv"\n[rule.ticket]\nproduct = "{recipient}"\n',
        catch_all=False,
    )
    assert route(rs, mail(), env("Hosting@Example.com")).ticket == {
        "product": "hosting@example.com"
    }
    assert route(rs, mail(to=("a@b.c",)), env()).ticket == {"product": "a@b.c"}


# --------------------------------------------------------------------------------------------
# Business hours with a controlled clock
# --------------------------------------------------------------------------------------------


def test_business_hours_in_the_configured_time_zone(tmp_path: Path) -> None:
    rs = single(tmp_path, 'weekday = "mon-fri"\ntime = "08:00-17:00"', timezone="Europe/Oslo")
    oslo = ZoneInfo("Europe/Oslo")
    assert hits(rs, now=datetime(2026, 11, 23, 8, 0, tzinfo=oslo))  # Monday 08:00
    assert not hits(rs, now=datetime(2026, 11, 23, 17, 0, tzinfo=oslo))  # end is exclusive
    assert not hits(rs, now=datetime(2026, 11, 22, 10, 0, tzinfo=oslo))  # Sunday
    # 07:30 UTC is 08:30 in Oslo in winter
    assert hits(rs, now=datetime(2026, 11, 23, 7, 30, tzinfo=UTC))
    assert not hits(rs, now=datetime(2026, 11, 23, 6, 30, tzinfo=UTC))
    # summer time: 06:30 UTC is 08:30 in Oslo
    assert hits(rs, now=datetime(2026, 6, 1, 6, 30, tzinfo=UTC))
    d = route(rs, now=datetime(2026, 11, 23, 18, 0, tzinfo=oslo))
    assert any("time 18:00 (CET) outside 08:00-17:00" in r for r in d.reasons)


def test_time_window_across_midnight_and_weekday_ranges(tmp_path: Path) -> None:
    rs = single(tmp_path, 'time = ["22:00-06:00", "12:00-12:30"]\nweekday = ["fri-mon"]')
    at = lambda d, h, m: datetime(2026, 11, d, h, m, tzinfo=UTC)  # noqa: E731  (23rd = Monday)
    assert hits(rs, now=at(23, 23, 0))  # Monday night
    assert hits(rs, now=at(23, 5, 59))  # Monday early morning
    assert not hits(rs, now=at(23, 6, 0))
    assert hits(rs, now=at(23, 12, 15))
    assert not hits(rs, now=at(24, 23, 0))  # Tuesday
    assert hits(rs, now=at(21, 23, 0))  # Saturday


# --------------------------------------------------------------------------------------------
# Linear-time matching
# --------------------------------------------------------------------------------------------


def test_pathological_pattern_on_a_huge_subject_returns(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        """
        [[rule]]
        name = "evil"
        backend = "whmcs"
        [rule.match]
        subject = [{ regex = "(a+)+$" }, "*a*a*a*a*a*a*a*a*b", { regex = "(x+x+)+y" }]
        """,
    )
    d = route(rs, mail(subject="a" * 1_000_000 + "!"))
    assert d.rule == "default"
    d = route(rs, mail(subject="a" * 1_000_000))
    assert d.rule == "evil"


def test_one_by_one_search_when_the_pattern_set_cannot_decide(tmp_path: Path) -> None:
    rs = single(tmp_path, 'subject = ["*refund*", { regex = "(?i)invoice" }]')
    for group in rs.pattern_sets.values():
        group.set = None
    assert hits(rs, mail(subject="Your INVOICE"))
    assert hits(rs, mail(subject="a refund"))
    assert not hits(rs, mail(subject="hello"))


# --------------------------------------------------------------------------------------------
# The shipped rules/ directory
# --------------------------------------------------------------------------------------------

DEMO_BACKENDS = {n: n for n in ("superoffice-soap", "superoffice-rest", "interserver", "whmcs")}


def test_demo_rules_route_the_four_addresses() -> None:
    rs = load_rules(REPO_RULES, DEMO_BACKENDS, templates={"default"})
    expected = {
        "support@example.com": ("support", "superoffice-soap"),
        "sales@example.com": ("sales", "superoffice-rest"),
        "hosting@example.com": ("hosting", "interserver"),
        "billing@example.com": ("billing", "whmcs"),
        "other@example.com": ("default", "superoffice-soap"),
    }
    for address, (rule, backend) in expected.items():
        d = rs.route(mail(to=(address,)), env(address), ctx())
        assert (d.rule, d.backend, d.action, d.ack) == (rule, backend, "new", "default")
    d = rs.route(mail(), env("support@example.com"), ctx())
    assert d.ticket == {
        "category": 1,
        "priority": -1,
        "slevel": "external",
        "extra": {"x_1": "alice@customer.example"},
    }


def test_commented_examples_in_demo_rules_load(tmp_path: Path) -> None:
    text = (REPO_RULES / "10-demo.toml").read_text(encoding="utf-8")
    examples = text[text.index("# [[rule]]") :]
    code = re.compile(r"# (\[|[A-Za-z_.\"-]+ *=)")  # commented TOML, not prose
    uncommented = "\n".join(line[2:] if code.match(line) else "" for line in examples.splitlines())
    d = tmp_path / "rules"
    write(d, "10-examples.toml", uncommented)
    write(d, "20-demo.toml", text)
    write(d, "99-default.toml", (REPO_RULES / "99-default.toml").read_text(encoding="utf-8"))
    rs = load_rules(d, DEMO_BACKENDS)
    assert "vip" in rs.rule_names and "support-weekends" in rs.rule_names
    sunday = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
    d1 = rs.route(mail(), env("support@example.com"), RouteContext(now=sunday))
    assert (d1.rule, d1.backend, d1.ticket["category"]) == (
        "support-weekends",
        "superoffice-soap",
        2,
    )
    d2 = rs.route(mail(subject="Refund for order 7"), env("sales@example.com"), ctx())
    assert (d2.rule, d2.backend) == ("invoices", "whmcs")


def test_design_core_syntax_example(tmp_path: Path) -> None:
    rs = rules(
        tmp_path,
        """
        [[rule]]
        name = "billing"                      # unique
        backend = "whmcs"                     # a name from [backends.NAME] in config
        ack = "default"                       # template name, or false (default: "default")
        action = "ticket"                     # ticket | suppress (default: ticket)
        continue = false                      # true: later rules may add or override fields
        [rule.match]                          # all keys must hold; a list means any of its values
        recipient = ["billing@example.com"]   # a plain string is exact
        sender = "*@vip.example.org"          #   one with * or ? is a glob,
        subject = { regex = "(?i)invoice|refund" }   # a table {regex = ...} is a regex (RE2)
        header."X-Priority" = "1*"
        [rule.ticket]                         # fields for this backend's type, validated at load
        deptid = 2
        priority = "High"
        """,
    )
    m = mail(
        to=("billing@example.com",),
        from_addr="boss@vip.example.org",
        subject="REFUND now",
        headers=(("X-Priority", "1 (Highest)"),),
    )
    d = route(rs, m)
    assert d.to_json() == {
        "rule": "billing",
        "backend": "whmcs",
        "action": "new",
        "ticket": {"deptid": 2, "priority": "High"},
        "followup_of": None,
        "ack": True,
        "reasons": list(d.reasons),
    }
    assert "header X-Priority '1 (Highest)' matched glob '1*'" in d.reasons[0]


def test_continue_is_spelled_continue(tmp_path: Path) -> None:
    p = one_problem(
        tmp_path, '[[rule]]\nname = "a"\nbackend = "soap"\ncontinue_ = true\nmatch.to = "x"\n'
    )
    assert p.line == 4 and p.message == "rule[0].continue_: unknown key"
