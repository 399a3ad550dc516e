"""Classify and route one parsed mail: the one path that the worker, `gateway route` (the dry run)
and the rule tests (`gateway.ruletests`) all take, so that they decide the same way.

The steps are pure; only the follow-up look-up between them is the caller's, because each caller
knows different things: the worker asks the spool (and may have to wait for an original still
queued), the dry run reads the spool without writing, the rule tests know no spool at all. Each
caller answers with a `Followup`; everything else (what is automatic, what is a loop, which
backend a subject token is looked up for first, how the follow-up enters the decision) is here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

from gateway import classify
from gateway.models import Decision, Envelope, ParsedMail
from gateway.rules import RouteContext, RuleSet


@dataclass(frozen=True)
class Followup:
    """What the caller's look-up found: the ticket `ref` this mail follows up (None: none), the
    backend that holds it when known, and a note for the decision's reasons."""

    ref: str | None = None
    backend: str | None = None
    note: str = ""

    @classmethod
    def unknown_token(cls, ref: str) -> Followup:
        """A subject token the spool does not know (a ticket made elsewhere): the rules' backend."""
        return cls(ref, None, f"subject token {ref} is not a ticket the gateway made")


def context(
    mail: ParsedMail, env: Envelope, now: datetime, own_addresses: Collection[str]
) -> RouteContext:
    """The classification every route starts from: automatic mail, loops, the clock."""
    return RouteContext(
        now=now,
        auto_reason=classify.auto_reason(mail, env),
        loop_reason=classify.loop_reason(mail, env, own_addresses),
    )


def subject_token(mail: ParsedMail, token_formats: list[str]) -> str | None:
    """The ticket ref in the subject (`[Ticket #<ref>]` after any reply prefix), or None."""
    return classify.find_subject_token(mail.subject, token_formats)


def preferred_backend(rules: RuleSet, mail: ParsedMail, env: Envelope, ctx: RouteContext) -> str:
    """The backend the rules pick for this mail as a new ticket: a subject token's ref is looked
    up there first (two systems may use the same ref)."""
    return rules.route(mail, env, ctx).backend


def route(
    rules: RuleSet, mail: ParsedMail, env: Envelope, ctx: RouteContext, followup: Followup
) -> Decision:
    """The decision, with the follow-up found by the caller (and its note among the reasons)."""
    decision = rules.route(
        mail,
        env,
        dataclasses.replace(ctx, followup_ref=followup.ref, followup_backend=followup.backend),
    )
    if followup.note:
        decision = dataclasses.replace(decision, reasons=(*decision.reasons, followup.note))
    return decision
