"""Who gets an acknowledgement: sender authentication (RFC 8601 headers from trusted authserv-ids
only), normalised rate-limit keys, safe subjects, and the hourly limits the spool enforces."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.ack import load_templates
from gateway.ackpolicy import (
    AckPolicy,
    ack_verdict,
    apply_policy,
    normalise_address,
    org_domain,
    parse_authentication_results,
    rate_keys,
    safe_subject,
)
from gateway.models import Decision, Envelope, ParsedMail
from gateway.spool.base import AckDraft, AckLimits, Outcome, State
from gateway.spool.sqlite import SqliteSpool

TRUSTED = AckPolicy(require="authenticated", trusted_authserv_ids=frozenset({"mx.example.com"}))
ENV = Envelope(mail_from="anna@customer.org", rcpt_tos=("support@example.com",))


def mail(*auth: str, from_addr: str = "anna@customer.org", reply_to: str = "") -> ParsedMail:
    return ParsedMail(
        subject="help",
        from_addr=from_addr,
        from_name="Visit http://spam.example",
        reply_to=reply_to,
        headers=tuple(("Authentication-Results", a) for a in auth),
    )


# -- normalised keys --------------------------------------------------------------------------------


def test_twenty_plus_variants_are_one_sender() -> None:
    keys = {rate_keys(f"Victim+{n}@Example.COM")[0] for n in range(20)}
    assert keys == {"victim@example.com"}


@pytest.mark.parametrize(
    ("addr", "key"),
    [
        ("V.i.c.t.i.m+x@googlemail.com", "victim@gmail.com"),
        ("victim@GMAIL.com", "victim@gmail.com"),
        ("first.last@example.org", "first.last@example.org"),  # dots matter elsewhere
        ("base-keyword@yahoo.com", "base@yahoo.com"),
        ('"Quoted"@example.org', "quoted@example.org"),
        ("<a+b@example.org>", "a@example.org"),
        ("jürgen@exämple.org", "jürgen@xn--exmple-cua.org"),
    ],
)
def test_normalise_address(addr: str, key: str) -> None:
    assert normalise_address(addr) == key


@pytest.mark.parametrize(
    ("domain", "org"),
    [
        ("mail.example.com", "example.com"),
        ("a.b.c.example.com", "example.com"),
        ("shop.example.co.uk", "example.co.uk"),
        ("example.com.au", "example.com.au"),
        ("EXAMPLE.org.", "example.org"),
    ],
)
def test_org_domain(domain: str, org: str) -> None:
    assert org_domain(domain) == org


# -- Authentication-Results -------------------------------------------------------------------------


def test_header_parsing_ignores_comments_and_reads_properties() -> None:
    parsed = parse_authentication_results(
        "mx.example.com (Postfix; 1.2); dkim=pass (2048-bit key; unprotected)"
        ' header.d=customer.org header.s="sel;1"; spf=fail smtp.mailfrom=x@y.org;'
        " dmarc=pass (p=reject dis=none) header.from=customer.org"
    )
    assert parsed is not None
    authserv, results = parsed
    assert authserv == "mx.example.com"
    assert [(r.method, r.result) for r in results] == [
        ("dkim", "pass"),
        ("spf", "fail"),
        ("dmarc", "pass"),
    ]
    assert results[0].props["header.d"] == "customer.org"


@pytest.mark.parametrize(
    ("header", "authenticated"),
    [
        ("mx.example.com; dmarc=pass header.from=customer.org", True),
        ("MX.Example.COM; dmarc=pass", True),  # authserv-id case-insensitive
        ("mx.example.com; dmarc=fail header.from=customer.org", False),
        ("mx.example.com; dmarc=pass header.from=other.org", False),
        ("evil.example.net; dmarc=pass header.from=customer.org", False),  # untrusted id
        ("mx.example.com; dkim=pass header.d=mail.customer.org", True),  # relaxed alignment
        ("mx.example.com; dkim=pass header.d=spammer.net", False),  # not aligned
        ("mx.example.com; spf=pass smtp.mailfrom=bounce@customer.org", True),
        ("mx.example.com; spf=pass smtp.mailfrom=bounce@spammer.net", False),
        ("mx.example.com; none", False),
        ("mx.example.com (dmarc=pass); dkim=none", False),  # a pass inside a comment
    ],
)
def test_authentication(header: str, authenticated: bool) -> None:
    verdict = ack_verdict(mail(header), ENV, TRUSTED)
    assert (verdict.rcpt is not None) is authenticated, verdict.reason


def test_only_the_topmost_header_of_a_trusted_id_counts() -> None:
    # the sender wrote a "pass" with our MTA's id; the MTA put its own (fail) on top
    verdict = ack_verdict(
        mail("mx.example.com; dmarc=fail", "mx.example.com; dmarc=pass"), ENV, TRUSTED
    )
    assert verdict.rcpt is None
    assert "no DMARC pass" in verdict.reason


def test_untrusted_header_is_named_in_the_reason() -> None:
    verdict = ack_verdict(mail("evil.example.net; dmarc=pass"), ENV, TRUSTED)
    assert verdict.rcpt is None
    assert "untrusted authserv-id(s) evil.example.net" in verdict.reason


def test_reply_to_elsewhere_is_not_answered_when_authenticating() -> None:
    header = "mx.example.com; dmarc=pass header.from=customer.org"
    v = ack_verdict(mail(header, reply_to="victim@elsewhere.org"), ENV, TRUSTED)
    assert v.rcpt == "anna@customer.org"
    v = ack_verdict(mail(header, reply_to="helpdesk@customer.org"), ENV, TRUSTED)
    assert v.rcpt == "helpdesk@customer.org"
    # "none" keeps answering Reply-To: only the limits protect the victim there
    v = ack_verdict(mail(reply_to="victim@elsewhere.org"), ENV, AckPolicy())
    assert v.rcpt == "victim@elsewhere.org"


def test_route_decision_says_why_no_acknowledgement() -> None:
    decision = Decision(rule="catch-all", backend="so", action="new", ack="default")
    d, verdict = apply_policy(decision, mail(), ENV, TRUSTED)
    assert d.ack is None and verdict is not None and verdict.rcpt is None
    assert d.reasons[-1].startswith("no acknowledgement: sender not authenticated")
    d, _ = apply_policy(decision, mail("mx.example.com; dmarc=pass"), ENV, TRUSTED)
    assert d.ack == "default"
    assert d.reasons[-1] == "acknowledgement allowed: dmarc=pass by mx.example.com"
    # automatic mail and rules without ack are left alone
    quiet = Decision(rule="r", backend="so", action="new", ack=None)
    assert apply_policy(quiet, mail(), ENV, TRUSTED) == (quiet, None)


@pytest.mark.parametrize(
    ("policy", "env", "addr", "why"),
    [
        (AckPolicy(enabled=False), ENV, "a@customer.org", "acknowledgements are off"),
        (AckPolicy(), Envelope("", ("s@x",)), "a@customer.org", "null envelope sender"),
        (
            AckPolicy(own_addresses=frozenset({"support@example.com"})),
            ENV,
            "Support+x@example.com",
            "one of our own",
        ),
        (AckPolicy(never_to=("noreply@*",)), ENV, "noreply@customer.org", "no-reply"),
    ],
)
def test_never_answered(policy: AckPolicy, env: Envelope, addr: str, why: str) -> None:
    verdict = ack_verdict(mail(from_addr=addr), env, policy)
    assert verdict.rcpt is None and why in verdict.reason


@pytest.mark.parametrize(
    ("value", "answered"),
    [
        ("All", False),
        ("DR, RN, NRN, OOF, AutoReply", False),
        ("autoreply", False),
        ("DR, RN, NRN", True),  # receipts only: an acknowledgement is none of them
        ("OOF", True),
        ("", True),
    ],
)
def test_a_sender_who_asks_for_no_automatic_replies_gets_no_acknowledgement(
    value: str, answered: bool
) -> None:
    asked = ParsedMail(
        subject="help",
        from_addr="anna@customer.org",
        headers=(("X-Auto-Response-Suppress", value),),
    )
    verdict = ack_verdict(asked, ENV, AckPolicy())
    if answered:
        assert verdict.rcpt == "anna@customer.org"
    else:
        assert verdict.rcpt is None
        assert verdict.reason.startswith("the sender asked for no automatic replies")


# -- what the default template quotes ----------------------------------------------------------------


def test_safe_subject_defangs_and_cuts() -> None:
    s = safe_subject("Buy now at http://spam.example/x or www.pills.example, mail me@x.org")
    assert "http" not in s and "spam.example" not in s and "www.pills" not in s
    assert "hxxp://spam[.]example" in s
    assert len(safe_subject("x" * 500)) == 60
    assert safe_subject("  Printer\r\n broken ") == "Printer broken"
    assert safe_subject("") == "(no subject)"


def test_default_template_quotes_no_display_name_and_no_link() -> None:
    from gateway.ack import build_ack

    template = load_templates(Path("/nonexistent"))["default"]
    spam = ParsedMail(
        subject="Cheap pills at http://spam.example " + "buy " * 40,
        from_addr="victim@example.org",
        from_name="Visit http://spam.example",
    )
    data, _ = build_ack(
        template,
        spam,
        rcpt="victim@example.org",
        ref="42",
        token="[Ticket #42]",
        from_address="support@example.com",
        from_name="Support",
        hostname="gw.example.com",
        backend="so",
    )
    text = data.decode()
    assert "Visit" not in text and "http://" not in text and "spam.example" not in text
    assert "[Ticket #42]" in text


# -- the hourly limits, enforced where the acknowledgement is queued --------------------------------


async def _queue(spool: SqliteSpool, rcpt: str, limits: AckLimits, *, ticket_from: str = "") -> str:
    put = await spool.put(b"Subject: x\r\n\r\nbody\r\n", Envelope(rcpt, ("support@example.com",)))
    key, domain = rate_keys(rcpt)
    return await spool.finish(
        put.id,
        Outcome(
            state=State.DONE,
            backend="so",
            ticket_ref=f"T{put.id}",
            ticket_id=f"T{put.id}",
            requester=ticket_from or rcpt,
            ack=AckDraft(rcpt, "", b"ack", f"ack{put.id}@gw", key, domain, limits),
        ),
    )


async def test_per_sender_limit_counts_variants_as_one(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.sqlite")
    limits = AckLimits(per_sender=5, per_domain=0, global_limit=0)
    try:
        results = [await _queue(spool, f"victim+{n}@example.org", limits) for n in range(20)]
        assert results.count("") == 5 and results[5:] == ["sender"] * 15
        assert await spool.acks_since("victim@example.org", 0) == 5
    finally:
        await spool.close()


async def test_per_domain_limit(tmp_path: Path) -> None:
    spool = SqliteSpool(tmp_path / "s.sqlite")
    limits = AckLimits(per_sender=5, per_domain=10, global_limit=0)
    try:
        results = [await _queue(spool, f"user{n}@mail.victim.org", limits) for n in range(20)]
        # subdomains count for their organisational domain too
        results.append(await _queue(spool, "other@victim.org", limits))
        assert results.count("") == 10 and results[10:] == ["domain"] * 11
    finally:
        await spool.close()


async def test_known_customer_keeps_getting_acks_while_strangers_are_capped(
    tmp_path: Path,
) -> None:
    spool = SqliteSpool(tmp_path / "s.sqlite")
    limits = AckLimits(per_sender=5, per_domain=0, global_limit=10, stranger_share=0.8)
    try:
        assert await _queue(spool, "customer@shop.example", limits) == ""  # earlier ticket
        strangers = [await _queue(spool, f"s{n}@flood{n}.example", limits) for n in range(20)]
        assert strangers.count("") == 7  # 8 stranger slots, one taken by the customer's first
        assert set(strangers[7:]) == {"global"}
        # the customer has a ticket conversation: still answered
        assert await _queue(spool, "customer@shop.example", limits) == ""
        assert await _queue(spool, "customer@shop.example", limits) == ""
        # the whole limit is a hard cap for everyone
        assert await _queue(spool, "customer@shop.example", limits) == "global"
    finally:
        await spool.close()
