"""Tests for gateway.mail: one sample message per case the parser must handle (tests/samples/)."""

from __future__ import annotations

import pickle
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.errors import ParseError
from gateway.mail import (
    MAX_HEADERS_TOTAL,
    decode_bytes,
    decode_words,
    extract_message_id,
    html_to_text,
    parse,
)
from gateway.models import ParsedMail

SAMPLES = Path(__file__).parent / "samples"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def parsed(name: str) -> ParsedMail:
    return parse(sample(name))


def attachment(mail: ParsedMail, filename: str) -> bytes:
    for a in mail.attachments:
        if a.filename == filename:
            return a.data
    raise AssertionError(f"no attachment {filename!r} in {[a.filename for a in mail.attachments]}")


# ---- every sample ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(SAMPLES.glob("*.eml")), ids=lambda p: p.name)
def test_every_sample_parses_to_utf8_clean_values(path: Path) -> None:
    raw = path.read_bytes()
    mail = parse(raw)
    assert mail.size == len(raw)
    for value in (mail.subject, mail.text, mail.html, mail.from_name, mail.date, *mail.defects):
        value.encode("utf-8")  # no lone surrogates: JSON, XML and SOAP sinks must accept them
    for name, value in mail.headers:
        assert "\n" not in value and "\r" not in value
        (name + value).encode("utf-8")
    assert mail.from_addr == mail.from_addr.lower()
    assert all(a == a.lower() for a in (*mail.to, *mail.cc))
    assert all("<" not in i and ">" not in i for i in (mail.message_id, *mail.references))
    assert extract_message_id(raw) == mail.message_id
    assert pickle.loads(pickle.dumps(mail)) == mail  # crosses the process-pool boundary


# ---- headers --------------------------------------------------------------------------------


def test_plain_utf8_mail() -> None:
    mail = parsed("plain_utf8.eml")
    assert mail.subject == "Drücker funktioniert nicht"
    assert (mail.from_addr, mail.from_name) == ("joerg.mueller@customer.example", "Jörg Müller")
    assert mail.to == ("support@example.com", "sales@example.com")
    assert mail.cc == ("boss@customer.example",)
    assert mail.message_id == "20240603091158.1234@customer.example"
    assert mail.date == "Mon, 3 Jun 2024 09:11:58 +0200"
    assert "leere Seiten" in mail.text
    assert mail.defects == ()
    assert mail.header("received") is not None
    assert mail.headers[0] == ("Return-Path", "<jane@customer.example>")


def test_encoded_words_broken_by_folding() -> None:
    mail = parsed("folded_encoded_words.eml")
    assert mail.subject == "Rechnung für März und April fehlt immer noch – bitte prüfen"
    assert mail.from_name == "Élise"
    assert mail.header("X-Broken-Fold") == "Grüße aus der Buchhaltung"  # fold inside a word
    assert mail.header("X-Split-Char") == "€😀"  # one character split over two encoded words
    assert mail.header("X-Mixed") == "Preis für 10 €"


def test_unknown_charsets_decode_as_utf8_with_a_defect() -> None:
    mail = parsed("bogus_charset.eml")
    assert mail.subject == "Kräfte and café"
    assert mail.from_name == "Björn"
    assert mail.text.startswith("Grüße aus Köln")
    assert any("x-bogus-charset" in d for d in mail.defects)


def test_unknown_charset_with_legacy_8bit_text_is_decoded_as_undeclared_text() -> None:
    # "x-unknown-8bit" is what some MTAs write when they do not know: the bytes are
    # Windows-1252 here, and must not turn into replacement characters
    raw = (
        b"From: a@customer.example\r\nTo: support@example.com\r\nSubject: s\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=x-unknown-8bit\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nCaf\xe9 cr\xe8me, 10 \x80\r\n"
    )
    mail = parse(raw)
    assert mail.text.startswith("Café crème, 10 €")
    assert "\ufffd" not in mail.text
    assert any("x-unknown-8bit" in d and "windows-1252" in d for d in mail.defects)
    # a known name written with a separator inside is that charset, not an unknown one
    assert decode_bytes(b"\xa4 10", "latin-9") == ("€ 10", None)
    assert decode_bytes("Привет".encode("cp1251"), "cp-1251") == ("Привет", None)
    assert decode_bytes(b"plain", "x-typo") == (
        "plain",
        "unknown charset 'x-typo': decoded as ASCII",
    )


def test_a_file_uuencoded_in_the_text_becomes_an_attachment_and_leaves_the_text() -> None:
    import binascii

    data = bytes(range(256)) * 3 + bytes(40)  # ends in zero bytes: spaces, stripped on the way
    block = "".join(
        binascii.b2a_uu(data[i : i + 45]).decode().rstrip(" \n") + "\n"
        for i in range(0, len(data), 45)
    )
    raw = (
        "From: notes@customer.example\r\nTo: support@example.com\r\nSubject: log\r\n\r\n"
        "The log is attached.\r\n\r\nbegin 644 server log.bin\r\n"
        + block.replace("\n", "\r\n")
        + "`\r\nend\r\n\r\nRegards\r\n"
    ).encode()
    mail = parse(raw)
    assert [(a.filename, a.data) for a in mail.attachments] == [("server log.bin", data)]
    assert "begin 644" not in mail.text and "Regards" in mail.text
    assert mail.text.startswith("The log is attached.")
    # one short line that lost its trailing space on the way, then the block's end line
    short = binascii.b2a_uu(b"error at line 42\n").decode().rstrip(" \n")
    mail = parse(f"From: a@customer.example\n\nLog:\nbegin 644 e.log\n{short}\n`\nend\n".encode())
    assert [(a.filename, a.data) for a in mail.attachments] == [("e.log", b"error at line 42\n")]
    # a sentence that merely looks like a block start, and a block that does not decode, stay
    prose = b"From: a@customer.example\r\n\r\nbegin 644 is a mode\r\nend\r\nbegin 644 x\r\n!!\r\nend\r\n"
    mail = parse(prose)
    assert mail.attachments == [] or all(a.filename != "x" for a in mail.attachments)
    assert "begin 644 is a mode" in mail.text and "!!" in mail.text


def test_raw_utf8_headers_rfc6532() -> None:
    mail = parsed("raw_utf8_headers.eml")
    assert mail.subject == "Ärger mit der Bestellung – 注文"
    assert mail.from_name == "Zoë Ünal"
    assert mail.header("To") == '"Ñandú Support" <support@example.com>'
    assert mail.defects == ()


def test_raw_8bit_non_utf8_headers_are_windows_1252() -> None:
    mail = parsed("raw8bit_cp1252_headers.eml")
    assert mail.subject == "Problème de facture – urgent"
    assert mail.from_name == "André Dupré"
    assert mail.text == "Le montant est de 100 €."
    assert any("Subject is not UTF-8" in d for d in mail.defects)


def test_windows_1252_labelled_iso_8859_1() -> None:
    mail = parsed("cp1252_as_latin1.eml")
    assert mail.subject == "Angebot “Premium” für 100 €"
    assert mail.text == "Das Angebot “Premium” kostet 100 € – bitte bestätigen."
    assert mail.from_name == "René"


def test_iso_2022_jp_with_extensions() -> None:
    mail = parsed("iso2022jp.eml")
    assert mail.subject == "注文について"
    assert mail.from_name == "山田"
    assert mail.text == "お問い合わせありがとうございます。\n半角ｶﾀｶﾅも使います。"
    assert mail.defects == ()


def test_missing_from_subject_message_id_date() -> None:
    mail = parsed("missing_headers.eml")
    assert (mail.from_addr, mail.subject, mail.message_id, mail.date) == ("", "", "", "")
    assert mail.to == ("support@example.com",)
    assert {"From missing", "Subject missing", "Message-Id missing", "Date missing"} <= set(
        mail.defects
    )
    assert mail.text.startswith("A message without From")


def test_sender_from_reply_to_then_sender() -> None:
    mail = parsed("sender_fallback.eml")
    assert mail.from_addr == "reply.here@customer.example"
    assert mail.from_name == "Help Desk User"
    assert mail.reply_to == "reply.here@customer.example"
    assert mail.sender_header == "list-bounces@lists.example"
    raw = sample("sender_fallback.eml").replace(b"Reply-To:", b"X-Old-Reply-To:")
    assert parse(raw).from_addr == "list-bounces@lists.example"


def test_address_looking_display_name_never_becomes_the_sender() -> None:
    mail = parsed("spoofed_display_name.eml")
    assert mail.from_addr == "evil@attacker.test"
    assert "support@example.com" not in mail.from_addr
    assert any("looks like another address" in d for d in mail.defects)
    for value in (
        b"From: support@example.com <evil@attacker.test>",
        b"From: =?utf-8?q?support=40example.com_=3Csupport=40example.com=3E?= <evil@attacker.test>",
        b'From: "Support <support@example.com>" <evil@attacker.test>',
    ):
        assert parse(value + b"\nSubject: x\n\nbody\n").from_addr == "evil@attacker.test"


def test_thousands_of_recipients() -> None:
    mail = parsed("many_recipients.eml")
    assert len(mail.to) == 3000 and len(mail.cc) == 3000
    assert mail.to[2999] == "user2999@customer.example"
    assert mail.cc[0] == "cc0@customer.example"


def test_recipient_parsing_is_linear() -> None:
    def mail(n: int) -> bytes:
        to = ", ".join(f'"User {i}" <u{i}@example.com>' for i in range(n))
        return f"From: a@example.com\nTo: {to}\nSubject: x\n\nbody\n".encode()

    small, large = mail(250), mail(2000)
    parse(small)

    def calls(raw: bytes) -> int:
        """Function calls (Python and C) made by one parse: a count, not a clock, so that a
        busy machine cannot fail the test (times are for bench/parse_time.py)."""
        n = 0

        def count(frame: Any, event: str, arg: Any) -> None:
            nonlocal n
            if event in ("call", "c_call"):
                n += 1

        sys.setprofile(count)
        try:
            mail = parse(raw)
        finally:
            sys.setprofile(None)
        assert len(mail.to) == raw.count(b"@example.com>")
        return n

    assert calls(large) < calls(small) * 8 * 1.5  # linear: 8x the recipients, about 8x the work


def test_very_large_header_section_is_capped() -> None:
    raw = sample("large_headers.eml")
    assert len(raw) > 300_000
    mail = parse(raw)
    assert mail.subject == "huge header section"
    assert mail.from_addr == "big@customer.example"
    assert mail.text == "Small body."
    assert sum(len(v) for _, v in mail.headers) <= MAX_HEADERS_TOTAL + 64 * 1024
    junk = mail.header("X-Junk")
    assert junk is not None and junk.endswith("[truncated]")
    assert mail.header("Auto-Submitted") == "no"  # essential headers after the junk survive
    assert mail.header("X-Priority") == "1"


def test_header_budget_keeps_essential_headers() -> None:
    filler = b"".join(b"X-Filler-%d: " % i + b"x" * 30000 + b"\n" for i in range(12))
    raw = b"From: a@example.com\n" + filler + b"List-Id: <l.example>\nX-Other: y\nSubject: s\n\nb\n"
    mail = parse(raw)
    assert mail.header("List-Id") == "<l.example>"
    assert mail.header("X-Other") is None
    assert mail.subject == "s"
    assert any("header budget" in d for d in mail.defects)


def test_thread_headers_without_angle_brackets() -> None:
    mail = parsed("threaded_reply.eml")
    assert mail.in_reply_to == ("ack-1001@example.com",)
    assert mail.references == ("orig-1@customer.example", "ack-1001@example.com")
    assert mail.subject == "AW: Re: [Ticket #1001] Drucker geht nicht"


def test_references_are_capped_keeping_the_root() -> None:
    refs = " ".join(f"<r{i}@x>" for i in range(500))
    mail = parse(f"From: a@b.c\nReferences: {refs}\nSubject: s\n\nb\n".encode())
    assert len(mail.references) == 100
    assert mail.references[0] == "r0@x" and mail.references[-1] == "r499@x"


def test_mbox_from_line() -> None:
    mail = parsed("mbox_from_line.eml")
    assert mail.from_addr == "someone@customer.example"
    assert mail.message_id == "mbox-1@customer.example"


def test_header_injection_through_encoded_crlf_is_impossible() -> None:
    raw = b"From: a@b.c\nSubject: =?utf-8?q?hi=0D=0ABcc=3A_victim=40x.test?=\n\nbody\n"
    assert parse(raw).subject == "hi  Bcc: victim@x.test"


# ---- MIME structure -------------------------------------------------------------------------


def test_missing_boundary_parameter_is_guessed() -> None:
    mail = parsed("missing_boundary_param.eml")
    assert mail.text == "The text the sender wrote."
    assert attachment(mail, "quote.pdf").startswith(b"%PDF")
    assert any("boundary taken from the body" in d for d in mail.defects)


def test_declared_boundary_not_in_body() -> None:
    mail = parsed("wrong_boundary.eml")
    assert mail.text == "Plain version of the text."
    assert mail.html == "<p>HTML version of the text.</p>"


def test_unclosed_boundary_keeps_every_part() -> None:
    mail = parsed("unclosed_boundary.eml")
    assert mail.text == "First part, still readable."
    assert attachment(mail, "data.csv") == b"a,b,c\n1,2,3"
    assert "CloseBoundaryNotFoundDefect (part top)" in mail.defects


def test_deep_nesting_is_bounded_and_kept() -> None:
    mail = parsed("deeply_nested.eml")
    assert any("nesting deeper than" in d for d in mail.defects)
    nested = [a for a in mail.attachments if a.filename.startswith("nested-parts")]
    assert len(nested) == 1 and b"the innermost text" in nested[0].data


def test_pathological_nesting_does_not_recurse() -> None:
    depth = 5000
    raw = b"From: a@b.c\nSubject: deep\n" + b"".join(
        b'Content-Type: multipart/mixed; boundary="d%d"\n\n--d%d\n' % (i, i) for i in range(depth)
    )
    start = time.perf_counter()
    mail = parse(raw)
    assert time.perf_counter() - start < 5
    assert mail.subject == "deep"
    nested_forward = b"From: a@b.c\nSubject: fw\n" + (
        b"Content-Type: message/rfc822\n\nFrom: b@c.d\nSubject: inner\n" * 3000
    )
    assert parse(nested_forward).subject == "fw"


def test_multipart_alternative_prefers_plain_and_keeps_html() -> None:
    mail = parsed("inline_cid.eml")
    assert mail.text == "See the screenshot: [image: shot.png]"
    assert 'src="cid:shot@customer.example"' in mail.html


def test_empty_plain_alternative_falls_back_to_html() -> None:
    mail = parsed("alternative_empty_plain.eml")
    assert mail.text == "Only the HTML part has text."


def test_text_parts_around_an_image_are_joined() -> None:
    mail = parsed("mixed_text_image_text.eml")
    assert mail.text == "Before the picture.\n\nAfter the picture."
    assert [a.filename for a in mail.attachments] == ["IMG_0001.jpeg"]
    assert mail.attachments[0].inline is False  # shown inline by Apple Mail, but a real file


def test_format_flowed_is_unwrapped() -> None:
    mail = parsed("format_flowed.eml")
    assert mail.text.startswith(
        "This is a long paragraph that the sending mail program wrapped at seventy-two columns"
        " with trailing spaces, so it must be joined again.\n"
    )
    assert "> quoted text that was also wrapped by the program." in mail.text
    assert mail.text.endswith("-- \nSignature line")


def test_lenient_transfer_encodings() -> None:
    mail = parsed("odd_transfer_encodings.eml")
    assert mail.text == "Grüße aus der Base64-Welt"  # '"Base64" ' with quotes and a space
    assert attachment(mail, "bad-padding.bin") == b"\x00\x01\x02\x03\x04"
    assert attachment(mail, "strange.bin") == b"raw bytes"
    assert any("x-gateway-unknown" in d for d in mail.defects)


# ---- forwards and reports -------------------------------------------------------------------


def test_forward_is_readable_in_the_body_and_kept_as_eml() -> None:
    mail = parsed("forward_rfc822.eml")
    assert mail.text.startswith("Please handle the customer's mail below.\n\n")
    assert "---------- Forwarded message ----------" in mail.text
    assert "From: Françoise <francoise@customer.example>" in mail.text
    assert "Subject: Invoice dispute" in mail.text
    assert "Invoice 2024-17 charges me twice. Ça ne va pas." in mail.text
    assert "invoice-2024-17.pdf" in mail.text  # named, not extracted a second time
    assert [a.filename for a in mail.attachments] == ["Invoice dispute.eml"]
    eml = mail.attachments[0]
    assert eml.content_type == "message/rfc822"
    inner = parse(eml.data)
    assert inner.message_id == "fwd-inner-1@customer.example"
    assert attachment(inner, "invoice-2024-17.pdf").startswith(b"%PDF")
    assert mail.report_type == ""


def test_base64_encoded_forward_is_decoded() -> None:
    mail = parsed("forward_base64_rfc822.eml")
    assert "Inner text of the original." in mail.text
    assert "Subject: Original subject" in mail.text


def test_delivery_status_report() -> None:
    mail = parsed("dsn_report.eml")
    assert mail.report_type == "delivery-status"
    assert mail.content_type == "multipart/report"
    assert mail.text.startswith("This is the mail system at host mx.example.com.")
    assert "Forwarded message" not in mail.text  # the returned mail is not part of the text
    status = attachment(mail, "delivery-status.txt").decode()
    assert "Final-Recipient: rfc822; nobody@customer.example" in status
    assert "Status: 5.1.1" in status
    returned = [a for a in mail.attachments if a.content_type == "message/rfc822"]
    assert len(returned) == 1 and b"ack-1001@example.com" in returned[0].data


def test_disposition_notification_report() -> None:
    mail = parsed("mdn_report.eml")
    assert mail.report_type == "disposition-notification"
    assert mail.text == "Your message was displayed on Fri, 7 Jun 2024."
    mdn = attachment(mail, "disposition-notification.txt").decode()
    assert "Original-Message-ID: <ack-1002@example.com>" in mdn


def test_report_type_inferred_when_parameter_missing() -> None:
    raw = sample("dsn_report.eml").replace(b"report-type=delivery-status;", b"")
    assert parse(raw).report_type == "delivery-status"


# ---- attachments ----------------------------------------------------------------------------


def test_inline_cid_images_versus_real_attachments() -> None:
    mail = parsed("inline_cid.eml")
    by_name = {a.filename: a for a in mail.attachments}
    assert by_name["shot.png"].inline is True
    assert by_name["shot.png"].content_id == "shot@customer.example"
    assert by_name["logo.png"].inline is False  # has a Content-ID, but the HTML never uses it
    assert by_name["manual.pdf"].inline is False
    assert by_name["shot.png"].data == b"\x89PNG\r\n\x1a\n"


def test_rfc2231_and_rfc2047_file_names() -> None:
    mail = parsed("rfc2231_filename.eml")
    names = [a.filename for a in mail.attachments]
    assert names == ["Prüfbericht €.pdf", "日本語の文書.txt", "übersicht.xlsx", "evil.exe"]
    assert mail.text == "Three files."


def test_zero_byte_attachments_are_kept() -> None:
    mail = parsed("zero_byte_attachment.eml")
    assert [(a.filename, a.size) for a in mail.attachments] == [("empty.log", 0), ("empty.bin", 0)]


def test_tnef_attachments_are_extracted() -> None:
    mail = parsed("tnef_winmail.eml")
    assert [a.filename for a in mail.attachments] == ["report.pdf", "budget.xlsx"]
    assert attachment(mail, "report.pdf") == b"%PDF-1.4 fake report\n"
    assert mail.attachments[0].content_type == "application/pdf"
    assert mail.text == "See the two files."  # the outer text wins over the TNEF body


def test_damaged_tnef_is_kept_as_is() -> None:
    mail = parsed("tnef_broken.eml")
    assert [a.filename for a in mail.attachments] == ["winmail.dat"]
    assert any("winmail.dat" in d for d in mail.defects)


def test_tnef_body_used_when_the_mail_has_no_other_text() -> None:
    raw = sample("tnef_winmail.eml").replace(b"See the two files.", b"")
    assert parse(raw).text == "Body inside TNEF"


def test_nameless_parts_get_generated_names() -> None:
    raw = (
        b"From: a@b.c\nSubject: s\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b\n\n"
        b"--b\nContent-Type: text/plain\n\nhi\n--b\nContent-Type: text/calendar\n\nBEGIN:VCALENDAR\n"
        b"--b\nContent-Type: application/pdf\n\n%PDF\n--b--\n"
    )
    assert [a.filename for a in parse(raw).attachments] == ["attachment-1.ics", "attachment-2.pdf"]


# ---- HTML -----------------------------------------------------------------------------------


def test_html_only_mail_is_converted() -> None:
    mail = parsed("html_only.eml")
    # inscriptis' layout: blocks on their own lines, list items bulleted, table cells in a row
    assert mail.text == (
        "Order problem\n\nHello & good morning,\n\n"
        "my order #4711 did not arrive. See the order page (https://shop.example/orders/4711) "
        "or help@shop.example.\n\n  * item one\n  * item <two>\nTotal  12€\n\nRegards\nKim"
    )
    assert "<script>" in mail.html


def test_html_to_text_details() -> None:
    assert html_to_text("<p>a</p><p>b</p>") == "a\n\nb"
    assert html_to_text("x<br>y<br/>z") == "x\ny\nz"
    # a link is kept as "text (url)" unless its text is the address already
    assert html_to_text('<a href="https://x.example/">https://x.example</a>') == "https://x.example"
    assert html_to_text('<a href="https://x.example/p">here</a>') == "here (https://x.example/p)"
    assert html_to_text('<a href="mailto:h@x.example">h@x.example</a>') == "h@x.example"
    assert html_to_text('<a href="#top">top</a> <a href="cid:i1"><img src="cid:i1"></a>') == "top"
    assert html_to_text("<pre>  a\n    b</pre>") == "  a\n    b"
    assert html_to_text("<head><title>t</title></head><body>b</body>") == "b"
    assert html_to_text("<head><title>t</title><body>no closing head</body>") == "no closing head"
    assert html_to_text("<style>x{}</style><script>y()</script>z &lt;&gt;&#x263a;") == "z <>☺"
    assert html_to_text("<div>a</div><div>b</div>") == "a\nb"
    assert html_to_text("") == html_to_text("   ") == html_to_text("<!-- only -->") == ""
    assert html_to_text("<![if !mso]><p>x<![endif]>") == "x"
    assert html_to_text('<?xml version="1.0" encoding="utf-8"?><p>declared</p>') == "declared"
    assert html_to_text("<table><tr><td>a</td><td>b</td></tr></table>after") == "a  b\n\nafter"
    assert html_to_text("<blockquote><p>quoted</p></blockquote>new") == "  quoted\n\nnew"


@pytest.mark.parametrize("depth", [300, 1500, 5000])
def test_html_nested_deeper_than_the_parsers_keeps_its_text(depth: int) -> None:
    # libxml2 stops at 255 levels by default (dropping the rest), 2,048 with huge_tree;
    # inscriptis recurses per level: each depth has its way to keep every word in order
    html = "<p>before</p>" + "<div>" * depth + "deep" + "</div>" * depth + "<p>a &amp; b</p>"
    text = html_to_text(html)
    assert text.split() == ["before", "deep", "a", "&", "b"]


def test_html_above_the_layout_limit_keeps_its_words(monkeypatch: pytest.MonkeyPatch) -> None:
    import gateway.mail as limits

    monkeypatch.setattr(limits, "MAX_HTML_PARSE", 100)
    html = "<style>p{}</style><p>first <b>bold</b> words</p>" + "<p>more</p>" * 20
    text = html_to_text(html)
    assert text.startswith("first bold words\n\nmore") and "p{}" not in text
    assert text.count("more") == 20


# ---- charsets -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "label", "expected", "noted"),
    [
        (b"caf\xc3\xa9", "utf-8", "café", False),
        (b"caf\xe9", "iso-8859-1", "café", False),
        (b"\x93q\x94 \x80", "ISO-8859-1", "“q” €", False),
        (b"\x81", "iso-8859-1", "\x81", False),  # undefined in cp1252: as ISO-8859-1
        (b"caf\xc3\xa9", "iso-8859-1", "café", True),  # UTF-8 mislabelled
        (b"caf\xe9", "utf-8", "café", True),  # Windows-1252 mislabelled
        (b"caf\xc3\xa9 \xff", "utf-8", "café \ufffd", True),
        (b"caf\xc3\xa9", None, "café", True),
        (b"caf\xc3\xa9", "x-nonsense", "café", True),
        (b"caf\xc3\xa9", '"UTF-8"', "café", False),
        (b"\x83e\x83X\x83g", "shift_jis", "テスト", False),
        (b"\xc4\xe3\xba\xc3", "gb2312", "你好", False),
        (b"abc", "unicode-escape", "abc", True),  # never a Python-only codec
        (b"\\u0041", "unicode-escape", "\\u0041", True),
        (b"a\x00", "utf-16", "a", False),
        (b"\x00\xd8a\x00", "utf-16", "\ufffda", True),  # a lone surrogate is no text
    ],
)
def test_decode_bytes(data: bytes, label: str | None, expected: str, noted: bool) -> None:
    text, note = decode_bytes(data, label)
    assert text == expected
    assert (note is not None) == noted


def test_decode_words() -> None:
    assert decode_words("=?utf-8?q?a?= =?utf-8?q?b?=") == "ab"
    assert decode_words("x =?utf-8?q?a?= y") == "x a y"
    assert decode_words("=?utf-8*de?q?Gr=C3=BC=C3=9Fe?=") == "Grüße"
    assert decode_words("=?utf-8?b?w6Q?=") == "ä"  # missing padding
    assert decode_words("=?utf-8?q?unterminated") == "=?utf-8?q?unterminated"


# ---- what cannot be read --------------------------------------------------------------------


@pytest.mark.parametrize("raw", [b"", b"   \r\n\t\n", b"\x00\x01\x02binary junk\x00"])
def test_unreadable_input_is_a_parse_error(raw: bytes) -> None:
    with pytest.raises(ParseError):
        parse(raw)
    assert extract_message_id(raw) == ""


def test_text_without_any_header_is_the_body() -> None:
    mail = parsed("no_headers.eml")
    assert mail.text.startswith("Hello support,")
    assert mail.headers == ()
    assert any("no header section" in d for d in mail.defects)


def test_leading_blank_lines_and_bom_are_tolerated() -> None:
    raw = b"\xef\xbb\xbf\r\n\r\nFrom: a@b.c\r\nMessage-ID: <x@y>\r\nSubject: s\r\n\r\nbody\r\n"
    mail = parse(raw)
    assert (mail.subject, mail.text, mail.message_id) == ("s", "body", "x@y")
    assert extract_message_id(raw) == "x@y"


def test_extract_message_id_reads_only_the_header_section() -> None:
    assert extract_message_id(b"Subject: a\nMessage-ID:\n <id-1@x>\n\nMessage-ID: <no@x>\n") == (
        "id-1@x"
    )
    assert extract_message_id(b"Subject: a\n\nMessage-ID: <body@x>\n") == ""
    assert extract_message_id(b"message-id: bare-id@x\n\n") == "bare-id@x"


def test_big_clean_base64_attachment_decodes_as_the_email_package_does() -> None:
    import base64
    import email
    import os

    from gateway.mail import _fast_base64

    data = os.urandom(300_000)
    for wrap in (76, 64, 1000):
        b64 = base64.b64encode(data).decode()
        text = "\r\n".join(b64[i : i + wrap] for i in range(0, len(b64), wrap))
        msg = email.message_from_string(
            "Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + text
        )
        assert _fast_base64(msg) == msg.get_payload(decode=True) == data
    # not clean: left to the email package (and its defect notes)
    dirty = email.message_from_string(
        "Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(data).decode() + "!*"
    )
    assert _fast_base64(dirty) is None


def test_big_attachments_survive_with_their_bytes_when_the_tree_lets_go() -> None:
    import base64
    import os

    blobs = [os.urandom(200_000 + i) for i in range(3)]
    parts = "".join(
        f"--b\r\nContent-Type: application/pdf; name=f{i}.pdf\r\n"
        "Content-Transfer-Encoding: base64\r\n\r\n"
        + "\r\n".join(
            base64.b64encode(blob).decode()[j : j + 76]
            for j in range(0, len(base64.b64encode(blob)), 76)
        )
        + "\r\n"
        for i, blob in enumerate(blobs)
    )
    raw = (
        "From: a@example.org\r\nSubject: files\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n" + parts + "--b--\r\n"
    ).encode()
    mail = parse(raw)
    assert [a.filename for a in mail.attachments] == ["f0.pdf", "f1.pdf", "f2.pdf"]
    assert [a.data for a in mail.attachments] == blobs
    assert "see attached" in mail.text
