"""The routing rules: loading and checking rules/*.toml, and routing one mail to one `Decision`.

This package owns the rule language (reference below), its validation (`load_rules` collects every
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

Modules
    match    pattern sets, matchers, conditions, placeholders, the compiled `Rule`
    fields   ticket-field checks per backend type
    load     reading and checking the rule files (`load_rules`)
    policy   `RouteContext` and `RuleSet.route`
"""

from __future__ import annotations

from gateway.rules.fields import BACKEND_TYPES, FIELDS
from gateway.rules.load import NO_CATCH_ALL, load_rules
from gateway.rules.match import (
    BODY_LIMIT,
    REGEX_MAX_MEM,
    SET_MAX_MEM,
    Rule,
    RuleAction,
    glob_to_regex,
)
from gateway.rules.policy import RouteContext, RuleSet

__all__ = [
    "BACKEND_TYPES",
    "BODY_LIMIT",
    "FIELDS",
    "NO_CATCH_ALL",
    "REGEX_MAX_MEM",
    "SET_MAX_MEM",
    "RouteContext",
    "Rule",
    "RuleAction",
    "RuleSet",
    "glob_to_regex",
    "load_rules",
]
