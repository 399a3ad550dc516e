"""Tests for gateway.classify: automatic mail, own addresses, subject tokens, threads, digests."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.classify import (
    auto_reason,
    compile_token_pattern,
    content_digest,
    envelope_sender,
    find_subject_token,
    is_own_address,
    strip_reply_prefixes,
    thread_ids,
)
from gateway.mail import parse
from gateway.models import Envelope, ParsedMail

SAMPLES = Path(__file__).parent / "samples"
TOKENS = ["[Ticket #{ref}]", "[Ticket ID: {ref}]"]


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def smtp(mail_from: str = "someone@customer.example") -> Envelope:
    return Envelope(mail_from=mail_from, rcpt_tos=("support@example.com",))


def reason(name: str, envelope: Envelope | None = None) -> str | None:
    return auto_reason(parse(sample(name)), envelope or smtp())


# ---- automatic mail -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("autoreply_rfc3834.eml", "auto-submitted: auto-replied"),
        ("dsn_report.eml", "auto-submitted: auto-replied"),  # Auto-Submitted comes first
        ("mdn_report.eml", "disposition notification (RFC 8098)"),
        ("oof_exchange.eml", "subject looks like auto reply"),
        ("oof_subject_only.eml", "subject looks like auto reply"),
        ("precedence_bulk.eml", "precedence: bulk"),
        ("list_mail.eml", "list-id"),
        ("list_unsubscribe_only.eml", "list-unsubscribe"),
        ("mailer_daemon_plain.eml", "mailer-daemon"),
        ("postmaster.eml", "postmaster"),
        ("x_autoreply.eml", "x-autoreply"),
    ],
)
def test_automatic_mail(name: str, expected: str) -> None:
    assert reason(name) == expected


def test_delivery_status_without_other_markers() -> None:
    raw = sample("dsn_report.eml").replace(b"Auto-Submitted: auto-replied\n", b"")
    raw = raw.replace(b"MAILER-DAEMON@", b"bounces@")
    assert auto_reason(parse(raw), smtp("bounces@mx.example.com")) == (
        "delivery status notification (RFC 3464)"
    )


@pytest.mark.parametrize(
    "name",
    [
        "plain_utf8.eml",
        "threaded_reply.eml",
        "human_out_of_office_question.eml",  # Auto-Submitted: no, Precedence: first-class
        "whmcs_token.eml",
        "forward_rfc822.eml",
        "html_only.eml",
        "inline_cid.eml",
        # Exchange puts X-Auto-Response-Suppress on mail people write: it asks for no automatic
        # reply (no acknowledgement), it does not make the mail automatic (no ticket)
        "outlook_suppress_header.eml",
    ],
)
def test_human_mail_is_not_automatic(name: str) -> None:
    assert reason(name) is None


def test_null_envelope_sender() -> None:
    mail = parse(sample("plain_utf8.eml"))
    assert auto_reason(mail, smtp("")) == "null envelope sender"
    assert auto_reason(mail, smtp("<>")) == "null envelope sender"


def test_envelope_sender_for_intakes_without_an_envelope() -> None:
    mail = parse(b"Return-Path: <>\nFrom: a@customer.example\nSubject: s\n\nb\n")
    imap = Envelope(mail_from="", rcpt_tos=(), intake="support-mailbox")
    assert envelope_sender(mail, imap) == ""
    assert auto_reason(mail, imap) == "null envelope sender"
    human = parse(sample("plain_utf8.eml"))  # Return-Path: <jane@customer.example>
    assert envelope_sender(human, imap) == "jane@customer.example"
    assert auto_reason(human, imap) is None
    no_path = parse(b"From: a@customer.example\nSubject: s\n\nb\n")
    pipe = Envelope(mail_from="", rcpt_tos=(), intake="pipe")
    assert envelope_sender(no_path, pipe) is None  # unknown, not the null sender
    assert auto_reason(no_path, pipe) is None


def test_mailer_daemon_as_envelope_sender() -> None:
    mail = parse(b"From: someone@customer.example\nSubject: Re: hello\n\nb\n")
    assert auto_reason(mail, smtp("MAILER-DAEMON@mx.customer.example")) == "mailer-daemon"


@pytest.mark.parametrize(
    "subject",
    [
        "Automatic reply: [Ticket #5] x",
        "Auto-Reply: your mail",
        "AutoReply: your mail",
        "Out of Office: back Monday",
        "Out of Office AutoReply: x",
        "Abwesenheitsnotiz: Ihre Nachricht",
        "Automatische Antwort: Ihre Anfrage",
        "Réponse automatique : votre demande",
        "Risposta automatica: richiesta",
        "Respuesta automática: consulta",
        "Autosvar: henvendelse",
        "Automatisch antwoord: vraag",
        "[Auto-Reply] Re: question",
        "Undeliverable: [Ticket #1] x",
    ],
)
def test_auto_reply_subjects(subject: str) -> None:
    mail = ParsedMail(subject=subject, from_addr="x@customer.example")
    assert auto_reason(mail, smtp()) in (
        "subject looks like auto reply",
        "subject looks like a bounce",
    )


@pytest.mark.parametrize(
    "subject",
    [
        "Out of office hours support?",
        "Re: Automatic reply settings in Outlook do not work",
        "Question about auto reply feature",
        "Delivery failure of my parcel",
        "Fwd: Out of Office: test",
    ],
)
def test_human_subjects_are_not_auto_replies(subject: str) -> None:
    mail = ParsedMail(subject=subject, from_addr="x@customer.example")
    assert auto_reason(mail, smtp()) is None


# ---- own addresses --------------------------------------------------------------------------


def test_is_own_address() -> None:
    own = {"support@example.com", "Billing@Example.com"}
    assert is_own_address("support@example.com", own)
    assert is_own_address("SUPPORT@EXAMPLE.COM", own)
    assert is_own_address("billing+acks@example.com", own)
    assert is_own_address("<support@example.com>", own)
    assert not is_own_address("support@example.org", own)
    assert not is_own_address("support2@example.com", own)
    assert not is_own_address("", own)
    assert not is_own_address("support@example.com", set())
    assert is_own_address("support@example.com", {"support+tag@example.com"})


# ---- subjects -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("Re: AW: Fwd: hello", "hello"),
        ("RE: RE: RE: hello", "hello"),
        ("SV: VS: Antw: Réf: TR: WG: FW: hello", "hello"),
        ("Re[2]: Re(3): hello", "hello"),
        ("Automatic reply: Re: hello", "hello"),
        ("Abwesenheitsnotiz: AW: hello", "hello"),
        ("回复：你好", "你好"),
        ("Re:hello", "hello"),
        ("Report: numbers", "Report: numbers"),
        ("Regarding: x", "Regarding: x"),
        ("hello", "hello"),
        ("", ""),
    ],
)
def test_strip_reply_prefixes(subject: str, expected: str) -> None:
    assert strip_reply_prefixes(subject) == expected


@pytest.mark.parametrize(
    ("subject", "expected"),
    [
        ("[Ticket #1001] Printer", "1001"),
        ("Re: [Ticket #1001] Printer", "1001"),
        ("AW: WG: [ticket #ABC-12] Frage", "ABC-12"),
        ("Automatic reply: [Ticket #77] x", "77"),
        ("Printer broken [Ticket #88]", "88"),
        ("RE: [Ticket ID: 456789] Invoice", "456789"),
        ("[Ticket  #1001] two spaces", "1001"),
        ("[Ticket # 1001] space after the hash", None),
        ("[Ticket #] empty", None),
        ("Ticket 1001", None),
        ("[Ticket #12] Re: [Ticket #34]", "12"),  # leftmost wins
        ("[Ticket #12_3] underscore", None),
    ],
)
def test_find_subject_token(subject: str, expected: str | None) -> None:
    assert find_subject_token(subject, TOKENS) == expected


def test_subject_token_after_rfc2047_decoding() -> None:
    mail = parse(sample("threaded_reply.eml"))
    assert find_subject_token(mail.subject, TOKENS) == "1001"
    assert find_subject_token(parse(sample("whmcs_token.eml")).subject, TOKENS) == "456789"


def test_token_pattern_must_name_ref_once() -> None:
    with pytest.raises(ValueError):
        compile_token_pattern("[Ticket]")
    with pytest.raises(ValueError):
        compile_token_pattern("{ref}-{ref}")
    assert compile_token_pattern("#{ref}").search("see #42 now")


# ---- threads --------------------------------------------------------------------------------


def test_thread_ids_most_recent_first() -> None:
    mail = ParsedMail(in_reply_to=("c@x",), references=("a@x", "b@x", "c@x"))
    assert thread_ids(mail) == ["c@x", "b@x", "a@x"]
    assert thread_ids(parse(sample("threaded_reply.eml"))) == [
        "ack-1001@example.com",
        "orig-1@customer.example",
    ]
    assert thread_ids(ParsedMail()) == []


# ---- duplicates -----------------------------------------------------------------------------


def test_same_mail_by_two_routes_has_one_digest() -> None:
    a, b = sample("duplicate_route_a.eml"), sample("duplicate_route_b.eml")
    assert a != b
    assert b"\r\n" in a and b"\r\n" not in b
    assert content_digest(a) == content_digest(b)
    assert parse(a).message_id == parse(b).message_id


def test_different_content_with_the_same_message_id() -> None:
    a, other = sample("duplicate_route_a.eml"), sample("same_msgid_different_content.eml")
    assert parse(a).message_id == parse(other).message_id
    assert content_digest(a) != content_digest(other)


def test_digest_changes_with_stable_headers_and_body() -> None:
    base = b"From: a@x\nTo: b@x\nSubject: s\nMessage-ID: <m@x>\n\nbody\n"
    digest = content_digest(base)
    assert content_digest(base.replace(b"Subject: s", b"Subject: t")) != digest
    assert content_digest(base.replace(b"body", b"body!")) != digest
    assert content_digest(base.replace(b"To: b@x", b"To: c@x")) != digest
    assert content_digest(b"Received: from x\n" + base) == digest
    assert content_digest(b"X-Gateway-Id: 7\nDKIM-Signature: v=1\n" + base) == digest
    assert content_digest(base.replace(b"\n", b"\r\n")) == digest
    assert len(digest) == 64


# ---- never raise ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.eml")), ids=lambda p: p.name)
def test_classify_functions_on_every_sample(path: Path) -> None:
    raw = path.read_bytes()
    mail = parse(raw)
    for envelope in (smtp(), smtp(""), Envelope("", (), intake="imap")):
        result = auto_reason(mail, envelope)
        assert result is None or isinstance(result, str)
    find_subject_token(mail.subject, TOKENS)
    strip_reply_prefixes(mail.subject)
    thread_ids(mail)
    is_own_address(mail.from_addr, {"support@example.com"})
    assert len(content_digest(raw)) == 64


def _digest_reference(raw: bytes) -> str:
    """content_digest as first written (whole-body copies): stored digests must stay the same."""
    import hashlib

    from gateway import classify as c

    start = c._LEADING_BLANK.match(raw)
    pos = start.end() if start else 0
    block = c._HEADER_BLOCK.match(raw, pos)
    end = block.end() if block else pos
    fields: dict[bytes, list[bytes]] = {}
    for m in c._HEADER_FIELD.finditer(raw[pos:end]):
        name = m.group(1).lower()
        if name.decode("ascii") in c.STABLE_DIGEST_HEADERS:
            fields.setdefault(name, []).append(c._WHITE.sub(b" ", m.group(2)).strip())
    digest = hashlib.sha256()
    for name in c.STABLE_DIGEST_HEADERS:
        for value in fields.get(name.encode("ascii"), []):
            digest.update(name.encode("ascii") + b":" + value + b"\n")
    digest.update(b"\n")
    body = raw[end:]
    blank = c._LINE_END.match(body)
    if blank:
        body = body[blank.end() :]
    digest.update(c._LINE_END.sub(b"\n", body).rstrip())
    return digest.hexdigest()


_BODY_BYTES = st.lists(
    st.sampled_from([b"a", b"b", b" ", b"\t", b"\r", b"\n", b"\r\n", b".", b"\x0b", b"\xc3\xa9"]),
    max_size=400,
).map(b"".join)


@given(
    head=st.sampled_from([b"Subject: s\r\nTo: b@x\r\n\r\n", b"From: a\n\n", b"", b"\n\n"]),
    body=_BODY_BYTES,
)
@settings(max_examples=300, deadline=None)
def test_digest_in_pieces_equals_the_whole_body_digest(head: bytes, body: bytes) -> None:
    import gateway.classify as c

    raw = head + body
    old_piece = c._DIGEST_PIECE
    try:
        for piece in (3, 7, 64, 1 << 18):
            c._DIGEST_PIECE = piece
            assert content_digest(raw) == _digest_reference(raw)
    finally:
        c._DIGEST_PIECE = old_piece


def test_digest_of_a_big_mail_equals_the_whole_body_digest() -> None:
    import os

    raw = (
        b"Subject: big\r\n\r\n"
        + b"\r\n".join(os.urandom(50).hex().encode() + b" \t" * (i % 3) for i in range(40_000))
        + b"\r\n  \r\n"
    )
    assert content_digest(raw) == _digest_reference(raw)
