"""Benchmark of `RuleSet.route`: 200 rules, the mail matches only the last one (issue 3).

Every rule mixes exact, glob and regex values on recipient, sender, subject, a header and the
body. In the worst case (default) every condition of the first 199 rules holds except the body
condition, so each rule is evaluated to its last, most expensive condition; `--early` makes the
first 199 rules fail at the recipient instead (the usual case). Parsing is excluded: the mail is
a ready `ParsedMail`. Also times a 1 MB subject against the pathological regex `(a+)+$`.

    .venv/bin/python bench/route.py [--iterations 3000] [--body-kb 4] [--early]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.models import Envelope, ParsedMail
from gateway.rules import RouteContext, RuleSet, load_rules

BACKENDS = {"soap": "superoffice-soap", "whmcs": "whmcs"}
N_RULES = 200


def q(text: str) -> str:
    """A TOML literal string (no escapes needed for our patterns)."""
    return "'" + text + "'"


def rule_text(i: int, *, last: bool, early: bool) -> str:
    form = i % 3  # 0 exact, 1 glob, 2 regex: rotated per condition so every rule mixes them
    recipients = [
        q("support@example.com"),
        q("support@*.com"),
        "{ regex = " + q(r"^support@example\.(com|net)$") + " }",
    ]
    senders = [
        q("alice@customer.example"),
        q("*@customer.example"),
        "{ regex = " + q(r"(?i)^[a-z]+@customer\.example$") + " }",
    ]
    headers = [q("gold"), q("g*d"), "{ regex = " + q(r"^(gold|platinum)$") + " }"]
    subjects = [
        q("Order 4711: delivery problem"),
        q("Order *: delivery problem"),
        "{ regex = " + q(r"(?i)order\s+\d+") + " }",
    ]
    bodies = [
        q(f"contract C-{i:04d}"),  # exact: the whole body would have to be this
        q(f"*contract C-{i:04d}*"),
        "{ regex = " + q(rf"(?i)\bcontract\s+C-{i:04d}\b") + " }",
    ]
    recipient = recipients[form]
    if early and not last:
        recipient = q(f"team{i}@example.com")  # fails first: the cheap, common case
    # every rule gets its own values (a unique first alternative), as real rule sets have
    unique = f"team{i}@example.com"
    body = bodies[(form + 1) % 3]
    if last:
        body = "{ regex = " + q(r"(?i)\bcontract\s+C-9999\b") + " }"
    return f"""
[[rule]]
name = "rule-{i:03d}"
backend = "{"whmcs" if i % 2 else "soap"}"
[rule.match]
recipient = [{q(unique)}, {recipient}]
sender = [{q(f"x{i}@vendor.example")}, {senders[(form + 1) % 3]}]
header."X-Customer-Tier" = [{q(f"tier-{i}")}, {headers[(form + 2) % 3]}]
subject = [{q(f"Ticket {i} *")}, {subjects[form]}]
body = {body}
"""


def build(early: bool) -> RuleSet:
    text = "".join(rule_text(i, last=i == N_RULES - 1, early=early) for i in range(N_RULES))
    text += '\n[[rule]]\nname = "default"\nbackend = "soap"\n'  # the required catch-all
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "10-bench.toml").write_text(text, encoding="utf-8")
        return load_rules(Path(tmp), BACKENDS)


def make_mail(body_kb: int) -> ParsedMail:
    filler = (
        "Hello, we have a problem with the delivery of our last order. The parcel arrived "
        "damaged and two items are missing. Please advise how to proceed.\n"
    )
    text = (filler * (body_kb * 1024 // len(filler) + 1))[: body_kb * 1024]
    text += "\nRegards, Alice (contract C-9999)\n"
    return ParsedMail(
        message_id="bench@example",
        subject="Order 4711: delivery problem",
        from_addr="alice@customer.example",
        from_name="Alice",
        to=("support@example.com",),
        headers=(("X-Customer-Tier", "gold"), ("Subject", "Order 4711: delivery problem")),
        text=text,
        size=len(text) + 800,
    )


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=3000)
    parser.add_argument("--body-kb", type=int, default=4)
    parser.add_argument("--early", action="store_true", help="rules fail at the recipient")
    args = parser.parse_args()

    started = time.perf_counter()
    rules = build(args.early)
    load_ms = (time.perf_counter() - started) * 1000
    mail = make_mail(args.body_kb)
    env = Envelope("alice@customer.example", ("support@example.com",))
    ctx = RouteContext(now=datetime(2026, 11, 23, 10, 0, tzinfo=UTC))

    decision = rules.route(mail, env, ctx)
    assert decision.rule == f"rule-{N_RULES - 1:03d}", decision.rule
    assert len(decision.reasons) == N_RULES
    for _ in range(200):  # warm up (RE2 builds its DFA states lazily)
        rules.route(mail, env, ctx)
    samples: list[float] = []
    for _ in range(args.iterations):
        t0 = time.perf_counter_ns()
        rules.route(mail, env, ctx)
        samples.append((time.perf_counter_ns() - t0) / 1000)

    mode = "first 199 rules fail at the recipient" if args.early else "worst case"
    print(
        f"rules: {N_RULES} + catch-all, loaded in {load_ms:.0f} ms; {mode}; body {args.body_kb} KiB"
    )
    median, p99 = statistics.median(samples), percentile(samples, 0.99)
    print(f"route(): median {median:.0f} us, p99 {p99:.0f} us over {args.iterations} mails")

    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "r.toml").write_text(
            '[[rule]]\nname = "evil"\nbackend = "soap"\n[rule.match]\n'
            "subject = { regex = '(a+)+$' }\nbody = { regex = '(a+)+$' }\n"
            '[[rule]]\nname = "default"\nbackend = "soap"\n',
            encoding="utf-8",
        )
        evil = load_rules(Path(tmp), BACKENDS)
    huge = ParsedMail(subject="a" * 1_000_000 + "!", text="a" * 1_000_000 + "!")
    t1 = time.perf_counter()
    decision = evil.route(huge, env, ctx)
    elapsed = (time.perf_counter() - t1) * 1000
    print(f"1 MB subject vs (a+)+$: {elapsed:.1f} ms (rule {decision.rule!r})")


if __name__ == "__main__":
    main()
