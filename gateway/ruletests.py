"""Rule tests: sample mails with the routing each must get, kept beside the rules and run by
`gateway check` and before a reload is accepted (DESIGN, "Rule tests").

Files: `<rules dir>/tests/*.toml`, read in file-name order, each holding `[[case]]` tables:

    [[case]]
    name = "billing goes to whmcs"          # required; shown nowhere but helps the reader
    mail = "samples/invoice.eml"            # a mail file, relative to the test file; or inline:
    # headers = { From = "a@example.org", To = "billing@example.com", Subject = "Invoice 42" }
    # body = "..."                          # (the text/plain body of the inline mail)
    rcpt = ["billing@example.com"]          # envelope recipients (default: the To and Cc)
    from = "a@example.org"                  # envelope sender (default: the From address)
    intake = "smtp"                         # "smtp" (default), "pipe" or an [[imap]] name
    at = 2026-03-02T10:00:00+01:00          # when it is routed (TOML date-time or ISO string;
                                            # default: now, in the configured time zone)
    [case.expect]                           # any of these; each is compared on its own
    rule = "billing"
    backend = "whmcs"
    action = "new"                          # new | followup | suppress
    ack = true                              # true/false, or the template name
    ticket = { deptid = 1 }                 # the fields named here (others are not compared)
    followup_of = "42"                      # the ticket ref followed up; false: not a follow-up

Each case goes the way the daemon routes a mail (`gateway.routing`): parsed, classified
(automatic mail, loops against the config's own addresses), the subject token looked for. No
spool is read: a follow-up is found by its subject token only (`[Ticket #42]`), as a ticket the
gateway did not make, so it goes to the backend the rules pick.

Every failed expectation is one `Problem` at the line of its key: `rules/tests/FILE:LINE:
expected backend "whmcs", got "superoffice-soap"`. A case that cannot run (unknown key, missing
mail file, bad time) is a problem at its own line, like a broken rule.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo

import pydantic
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr

from gateway import routing
from gateway.errors import ConfigError, ParseError, Problem
from gateway.mail import parse
from gateway.models import Decision, Envelope
from gateway.rules import RuleSet
from gateway.tomlpos import LineMap, Loc, load_toml, pydantic_problems

TESTS_DIR = "tests"  # below the rules directory

_UNSET: Any = object()


class _Expect(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rule: StrictStr | None = None
    backend: StrictStr | None = None
    action: Literal["new", "followup", "suppress"] | None = None
    ack: StrictBool | StrictStr | None = None
    ticket: dict[str, Any] | None = None
    followup_of: StrictStr | Literal[False] | None = None


class _Case(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: StrictStr = Field(min_length=1)
    mail: StrictStr | None = None
    headers: dict[str, StrictStr] | None = None
    body: StrictStr = ""
    rcpt: list[StrictStr] | StrictStr | None = None
    from_: StrictStr | None = Field(None, alias="from")
    intake: StrictStr = "smtp"
    at: datetime | date | StrictStr | None = None
    expect: _Expect


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    case: list[dict[str, Any]] = Field(default_factory=list)


@dataclass(frozen=True)
class Summary:
    """What a run found: how many cases ran, and every problem (failed expectations included)."""

    files: int
    cases: int
    problems: tuple[Problem, ...]


def run_rule_tests(
    rules: RuleSet,
    rules_dir: Path,
    *,
    own_addresses: Collection[str],
    token_formats: list[str],
    timezone: str = "UTC",
) -> Summary:
    """Run every case of `rules_dir`/tests/*.toml against `rules`; never raises for a case."""
    directory = rules_dir / TESTS_DIR
    files = sorted(directory.glob("*.toml")) if directory.is_dir() else []
    problems: list[Problem] = []
    cases = 0
    try:
        zone = ZoneInfo(timezone)
    except Exception:  # the rules' loader reported it already
        zone = ZoneInfo("UTC")
    for path in files:
        try:
            data, lines = load_toml(path)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        try:
            doc = _File.model_validate(data)
        except pydantic.ValidationError as exc:
            problems.extend(pydantic_problems(exc, str(path), lines))
            continue
        if not doc.case:
            problems.append(Problem(str(path), 1, "no [[case]] in this rule test file"))
        for i, raw in enumerate(doc.case):
            cases += 1
            runner = _CaseRun(path, lines, ("case", i), rules, own_addresses, token_formats, zone)
            problems.extend(runner.run(raw))
    return Summary(len(files), cases, tuple(problems))


def load_and_check(
    rules: RuleSet,
    rules_dir: Path,
    *,
    own_addresses: Collection[str],
    token_formats: list[str],
    timezone: str = "UTC",
) -> Summary:
    """`run_rule_tests`, raising ConfigError with every problem when any case fails."""
    summary = run_rule_tests(
        rules,
        rules_dir,
        own_addresses=own_addresses,
        token_formats=token_formats,
        timezone=timezone,
    )
    if summary.problems:
        raise ConfigError(list(summary.problems))
    return summary


@dataclass
class _CaseRun:
    path: Path
    lines: LineMap
    loc: Loc
    rules: RuleSet
    own_addresses: Collection[str]
    token_formats: list[str]
    zone: ZoneInfo

    def problem(self, sub: Loc, message: str) -> Problem:
        return Problem(str(self.path), self.lines.line_of((*self.loc, *sub)), message)

    def run(self, raw: dict[str, Any]) -> list[Problem]:
        try:
            case = _Case.model_validate(raw)
        except pydantic.ValidationError as exc:
            return pydantic_problems(exc, str(self.path), self.lines, prefix=self.loc)
        try:
            data = self.mail_bytes(case)
            mail = parse(data)
            now = self.moment(case.at)
        except _CaseError as exc:
            return [self.problem(exc.where, exc.message)]
        except ParseError as exc:
            return [self.problem(("mail",), f"the mail cannot be read: {exc}")]
        if case.rcpt is None:
            rcpts: tuple[str, ...] = (*mail.to, *mail.cc)
        else:
            rcpts = tuple(
                a.lower() for a in ([case.rcpt] if isinstance(case.rcpt, str) else case.rcpt)
            )
        env = Envelope(
            mail_from=case.from_ if case.from_ is not None else mail.from_addr,
            rcpt_tos=rcpts,
            intake=case.intake,
            received_at=now.timestamp(),
        )
        ctx = routing.context(mail, env, now, self.own_addresses)
        ref = routing.subject_token(mail, self.token_formats)
        followup = routing.Followup.unknown_token(ref) if ref is not None else routing.Followup()
        decision = routing.route(self.rules, mail, env, ctx, followup)
        return sorted(self.compare(case.expect, decision), key=lambda p: p.line)

    def mail_bytes(self, case: _Case) -> bytes:
        if (case.mail is None) == (case.headers is None):
            raise _CaseError((), "give either mail (a file) or headers (and body), not both")
        if case.mail is not None:
            file = (self.path.parent / case.mail).resolve()
            try:
                return file.read_bytes()
            except OSError as exc:
                raise _CaseError(("mail",), f"mail file {case.mail!r}: {exc.strerror}") from exc
        assert case.headers is not None
        msg = EmailMessage(policy=SMTP)
        try:
            for name, value in case.headers.items():
                msg[name] = value
            msg.set_content(case.body)
        except (ValueError, TypeError) as exc:
            raise _CaseError(("headers",), f"cannot build the mail: {exc}") from exc
        return msg.as_bytes()

    def moment(self, at: datetime | date | str | None) -> datetime:
        if at is None:
            return datetime.now(UTC).astimezone(self.zone)
        if isinstance(at, str):
            try:
                at = datetime.fromisoformat(at)
            except ValueError as exc:
                raise _CaseError(("at",), f"bad time {at!r}: write an ISO date-time") from exc
        if not isinstance(at, datetime):  # a bare date: its midnight
            at = datetime.combine(at, time())
        if at.tzinfo is None:
            at = at.replace(tzinfo=self.zone)
        return at.astimezone(self.zone)

    def compare(self, expect: _Expect, got: Decision) -> list[Problem]:
        out: list[Problem] = []
        for key in ("rule", "backend", "action"):
            want = getattr(expect, key)
            have = getattr(got, key)
            if want is not None and want != have:
                out.append(self.problem(("expect", key), f"expected {key} {_show(want)}, got "
                                        f"{_show(have)}"))  # fmt: skip
        if expect.ack is not None:
            have_ack: Any = got.ack if got.ack is not None else False
            if isinstance(expect.ack, bool):
                ok = expect.ack == (got.ack is not None)
                have_ack = got.ack is not None
            else:
                ok = expect.ack == got.ack
            if not ok:
                out.append(
                    self.problem(
                        ("expect", "ack"),
                        f"expected ack {_show(expect.ack)}, got {_show(have_ack)}",
                    )
                )
        if expect.followup_of is not None:
            want_ref = expect.followup_of or None
            if want_ref != got.followup_of:
                out.append(
                    self.problem(
                        ("expect", "followup_of"),
                        f"expected followup_of {_show(want_ref)}, got {_show(got.followup_of)}",
                    )
                )
        for name, want in (expect.ticket or {}).items():
            have = got.ticket.get(name, _UNSET)
            if have is _UNSET or have != want:
                shown = "nothing" if have is _UNSET else _show(have)
                out.append(
                    self.problem(
                        ("expect", "ticket", name),
                        f"expected ticket.{name} {_show(want)}, got {shown}",
                    )
                )
        return out


class _CaseError(Exception):
    def __init__(self, where: Loc, message: str) -> None:
        super().__init__(message)
        self.where, self.message = where, message


def _show(value: Any) -> str:
    """A value as written in TOML/JSON: strings quoted, booleans lower-case, None as none."""
    if value is None:
        return "none"
    return json.dumps(value, ensure_ascii=False, sort_keys=True)
