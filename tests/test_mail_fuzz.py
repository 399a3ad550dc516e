"""Robustness of gateway.mail and gateway.classify: property tests and the stdlib's corpus.

Random and mutated messages (the samples under tests/samples/ with bytes, lines and boundaries
changed) never make parse() raise anything but ParseError; the classify functions never raise;
every message of the standard library's own email test corpus parses without even ParseError.
"""

from __future__ import annotations

import email
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.classify import (
    auto_reason,
    content_digest,
    find_subject_token,
    is_own_address,
    strip_reply_prefixes,
    thread_ids,
)
from gateway.errors import ParseError
from gateway.mail import extract_message_id, parse
from gateway.models import Envelope, ParsedMail

SAMPLES = Path(__file__).parent / "samples"
STDLIB_CORPUS = Path(email.__file__).parent.parent / "test" / "test_email" / "data"
SEEDS = [p.read_bytes() for p in sorted(SAMPLES.glob("*.eml")) if p.stat().st_size < 20_000]
TOKENS = ["[Ticket #{ref}]", "[Ticket ID: {ref}]"]
ENVELOPES = [
    Envelope("someone@customer.example", ("support@example.com",)),
    Envelope("", ("support@example.com",)),
    Envelope("", (), intake="support-mailbox"),
]
# Fragments that steer mutations towards the parser's weak spots.
FRAGMENTS = [
    b"=?utf-8?q?", b"=?x-bogus?b?", b"?=", b"=?iso-2022-jp?b?GyRCJEgbKEI=?=", b"\n--", b"--\n",
    b"\nContent-Type: multipart/mixed; boundary=x\n\n--x\n", b"Content-Type: message/rfc822\n\n",
    b"Content-Type: multipart/report; report-type=delivery-status\n",
    b"Content-Type: message/delivery-status\n\n", b"Content-Type: application/ms-tnef\n\n",
    b"x\x9f>\"\x01\x00", b"Content-Transfer-Encoding: base64\n", b"Content-Transfer-Encoding: qu",
    b"charset=x-nonsense", b"charset=utf-16", b"charset=iso-2022-jp", b"format=flowed",
    b"filename*0*=utf-8''%ff%fe; filename*1=", b'name="=?utf-8?b?', b"\x00", b"\xff\xfe\x80",
    b"\r", b"\r\n", b"\n\n", b"\n ", b"<", b">", b'"', b",", b"@", b"<html><a href=", b"</a>",
    b"<script>", b"<![CDATA[", b"<!--", b"&#xd800;", b"cid:", b"From: ", b"Message-ID: <",
    b"References: <a@b> <", b"Subject: =?utf-8?q?Re=3A_=5BTicket_=23", b"From ",
]  # fmt: skip


@st.composite
def mutated_messages(draw: st.DrawFn) -> bytes:
    raw = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "delete", "duplicate", "insert", "fragment",
                                   "truncate", "lines", "boundary", "newlines"]))  # fmt: skip
        size = len(raw)
        pos = draw(st.integers(0, size))
        if op == "flip" and size:
            raw[min(pos, size - 1)] = draw(st.integers(0, 255))
        elif op == "delete":
            del raw[pos : pos + draw(st.integers(1, 200))]
        elif op == "duplicate":
            raw[pos:pos] = raw[pos : pos + draw(st.integers(1, 400))] * draw(st.integers(1, 4))
        elif op == "insert":
            raw[pos:pos] = draw(st.binary(min_size=1, max_size=40))
        elif op == "fragment":
            raw[pos:pos] = draw(st.sampled_from(FRAGMENTS))
        elif op == "truncate":
            del raw[pos:]
        elif op == "lines":
            lines = bytes(raw).split(b"\n")
            i = draw(st.integers(0, len(lines) - 1))
            j = draw(st.integers(0, len(lines) - 1))
            action = draw(st.sampled_from(["swap", "drop", "copy"]))
            if action == "swap":
                lines[i], lines[j] = lines[j], lines[i]
            elif action == "drop":
                del lines[i]
            else:
                lines.insert(j, lines[i])
            raw = bytearray(b"\n".join(lines))
        elif op == "boundary":
            lines = bytes(raw).split(b"\n")
            marks = [k for k, line in enumerate(lines) if line.startswith(b"--")]
            if marks:
                k = draw(st.sampled_from(marks))
                lines[k] = draw(st.sampled_from([b"", b"--", lines[k] + b"x", lines[k][:-2],
                                                 lines[k] + b"--", b"--" + lines[k]]))  # fmt: skip
            raw = bytearray(b"\n".join(lines))
        elif op == "newlines":
            raw = bytearray(bytes(raw).replace(b"\n", draw(st.sampled_from([b"\r\n", b"\r"]))))
    return bytes(raw)


def check(raw: bytes) -> None:
    """parse() raises nothing but ParseError; classify never raises; the values are clean."""
    try:
        mail = parse(raw)
    except ParseError:
        mail = None
    message_id = extract_message_id(raw)
    assert len(content_digest(raw)) == 64
    if mail is None:
        return
    assert mail.size == len(raw)
    assert extract_message_id(raw) == message_id
    for value in (mail.subject, mail.text, mail.html, mail.from_name, mail.from_addr, *mail.to,
                  *mail.defects, *(v for _, v in mail.headers), *(a.filename for a in mail.attachments)):  # fmt: skip
        value.encode("utf-8")  # no lone surrogates
    for _, value in mail.headers:
        assert "\r" not in value and "\n" not in value
    classify(mail)


def classify(mail: ParsedMail) -> None:
    for envelope in ENVELOPES:
        result = auto_reason(mail, envelope)
        assert result is None or isinstance(result, str)
    ref = find_subject_token(mail.subject, TOKENS)
    assert ref is None or isinstance(ref, str)
    assert isinstance(strip_reply_prefixes(mail.subject), str)
    assert all(isinstance(i, str) for i in thread_ids(mail))
    assert isinstance(is_own_address(mail.from_addr, {"support@example.com"}), bool)


# GATEWAY_FUZZ_EXAMPLES=20000 for a long run by hand; CI keeps the default.
FUZZ = settings(
    max_examples=int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)


@FUZZ
@given(mutated_messages())
def test_mutated_samples_never_crash(raw: bytes) -> None:
    check(raw)


@FUZZ
@given(st.binary(max_size=4000))
def test_random_bytes_never_crash(raw: bytes) -> None:
    check(raw)


header_names = st.sampled_from(
    ["From", "To", "Cc", "Subject", "Message-ID", "References", "In-Reply-To", "Content-Type",
     "Content-Transfer-Encoding", "Content-Disposition", "Auto-Submitted", "Precedence",
     "List-Id", "Reply-To", "Sender", "X-Autoreply", "Return-Path"]
)  # fmt: skip


@FUZZ
@given(
    st.lists(st.tuples(header_names, st.text(max_size=80)), max_size=12),
    st.text(max_size=500),
    st.sampled_from(["utf-8", "latin-1", "cp1252", "utf-16"]),
)
def test_random_headers_and_bodies_never_crash(
    headers: list[tuple[str, str]], body: str, encoding: str
) -> None:
    errors = "surrogatepass" if encoding.startswith("utf") else "replace"
    head = "".join(f"{name}: {value}\n" for name, value in headers)
    check(head.encode(encoding, errors) + b"\n" + body.encode(encoding, errors))


@FUZZ
@given(
    st.text(max_size=200),
    st.lists(st.tuples(header_names, st.text(max_size=60)), max_size=8),
    st.tuples(st.text(max_size=30), st.text(max_size=30)),
    st.sampled_from(["", "delivery-status", "disposition-notification", "x"]),
)
def test_classify_never_raises_on_any_parsed_mail(
    subject: str, headers: list[tuple[str, str]], ids: tuple[str, str], report: str
) -> None:
    mail = ParsedMail(
        subject=subject,
        headers=tuple(headers),
        from_addr=ids[0],
        in_reply_to=(ids[0],),
        references=(ids[1], ids[0]),
        report_type=report,
    )
    classify(mail)
    assert isinstance(is_own_address(ids[1], {ids[0], "a@b"}), bool)
    assert isinstance(
        find_subject_token(subject, ["{ref}", "[#{ref}]", *TOKENS]), (str, type(None))
    )


# ---- the standard library's own corpus ------------------------------------------------------


def _corpus() -> list[Path]:
    return sorted(STDLIB_CORPUS.glob("msg_*.txt")) if STDLIB_CORPUS.is_dir() else []


@pytest.mark.skipif(
    not _corpus(), reason=f"stdlib email test corpus not installed at {STDLIB_CORPUS}"
)
@pytest.mark.parametrize("path", _corpus(), ids=lambda p: p.name)
def test_stdlib_email_corpus(path: Path) -> None:
    raw = path.read_bytes()
    mail = parse(raw)  # neither a crash nor a ParseError: every one of them is readable
    assert mail.size == len(raw)
    check(raw)
