"""The routing policy around the rules (loops, automatic mail, follow-ups) and the loaded,
immutable `RuleSet` that routes one mail to one `Decision`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from gateway.models import Decision, Envelope, ParsedMail
from gateway.rules.fields import _field_error
from gateway.rules.match import FieldValue, Rule, _PatternSet, _RouteState, _Template


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

        ticketed = any(r.match_automatic is True for r in chain)
        if automatic and not followup and not ticketed:
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
                automatic_ticketed=automatic and ticketed,
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
            automatic_ticketed=automatic,  # automatic mail gets here only when a rule allows it
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
