"""Text fidelity: Japanese vendor extensions, undeclared 8-bit text (site fallbacks, detector), a
plain alternative that is only a stub of the HTML one, inline images in the ticket."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import pytest

from gateway.backends.text import select_attachments
from gateway.config import MailSection
from gateway.mail import decode_bytes, parse


def test_iso_2022_jp_with_microsoft_extensions_decodes_through_cp932() -> None:
    # OTRS's PostMaster-Test12 attachment name: NEC row 13 (①) inside ESC $ B
    data = unquote_to_bytes("%1B%24BJs9p%3Dq%2D%21%1B%28B%2E.txt")
    assert decode_bytes(data, "iso-2022-jp") == ("報告書①..txt", None)
    # plain ISO-2022-JP and half-width katakana still decode as before
    text = "こんにちは ｶﾀｶﾅ abc"
    assert decode_bytes(text.encode("iso2022_jp_ext"), "ISO-2022-JP") == (text, None)
    # Shift_JIS labels take cp932 (its NEC and IBM rows)
    assert decode_bytes("①②㈱".encode("cp932"), "shift_jis") == ("①②㈱", None)


def test_undeclared_8bit_subject_uses_the_sites_fallback_charsets() -> None:
    raw = b"From: a@example.org\nSubject: " + "тест тест".encode("koi8-r") + b"\n\nbody\n"
    assert parse(raw).subject == "ÔÅÓÔ ÔÅÓÔ"  # too short for a detector: Windows-1252
    mail = parse(raw, fallback_charsets=["koi8-r"])
    assert mail.subject == "тест тест"
    assert "8-bit header Subject is not UTF-8: decoded as koi8-r" in mail.defects
    # UTF-8 still wins over any fallback
    utf8 = b"From: a@example.org\nSubject: " + "Grüße".encode() + b"\n\nbody\n"
    assert parse(utf8, fallback_charsets=["koi8-r"]).subject == "Grüße"


def test_undeclared_8bit_body_is_detected_when_long_enough() -> None:
    text = "Привет, как дела? Это проверка кодировки письма без объявленной кодировки."
    raw = b"From: a@example.org\nSubject: x\n\n" + text.encode("koi8-r") + b"\n"
    mail = parse(raw)
    assert mail.text == text
    assert any("(detected)" in d for d in mail.defects)
    # Western text without a label stays Windows-1252 (what the detector cannot tell apart)
    west = "Grüße aus Köln, die Straße ist schön und das Café hat geöffnet. " * 2
    raw = b"From: a@example.org\nSubject: x\n\n" + west.encode("cp1252") + b"\n"
    assert parse(raw).text.strip() == west.strip()


def test_fallback_charsets_are_checked_at_load() -> None:
    assert MailSection(fallback_charsets=["koi8-r", "cp1251"]).fallback_charsets
    with pytest.raises(ValueError, match="unknown charset"):
        MailSection(fallback_charsets=["klingon-8"])


def alternative(plain: str, html: str) -> bytes:
    return (
        "From: news@shop.example\nSubject: Offers\nMIME-Version: 1.0\n"
        "Content-Type: multipart/alternative; boundary=b\n\n"
        f"--b\nContent-Type: text/plain\n\n{plain}\n"
        f"--b\nContent-Type: text/html\n\n{html}\n--b--\n"
    ).encode()


@pytest.mark.parametrize(
    "plain",
    [
        "To view this email in your browser, click here.",
        "Diese E-Mail im Browser ansehen",
        "Your mail program does not support HTML mail.",
        "Offers",  # a mailer's plain part made of the title only
    ],
)
def test_a_stub_plain_part_gives_way_to_the_html(plain: str) -> None:
    html = (
        "<h1>Offers</h1><p>Big sale on <b>printers</b>: 20% off the HP 4000 until Friday,"
        " and free delivery for every order above 50 euros in the whole of December.</p>"
        "<p>Ink cartridges come with a second one free of charge.</p>"
    )
    mail = parse(alternative(plain, html))
    assert "20% off the HP 4000" in mail.text and "second one free" in mail.text


def test_a_real_plain_part_is_kept() -> None:
    plain = "Hello Kim,\n\nthe printer is fixed. It needed a new fuser unit.\n\nRegards\nSam"
    html = "<p>Hello Kim,</p><p>the printer is <b>fixed</b>. It needed a new fuser unit.</p>"
    assert parse(alternative(plain, html)).text == plain


def test_inline_images_go_to_the_ticket_as_files() -> None:
    raw = (
        b"From: a@example.org\nSubject: x\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/related; boundary="r"\n\n'
        b'--r\nContent-Type: text/html\n\n<p>See <img src="cid:shot@x"></p>\n'
        b"--r\nContent-Type: image/png\nContent-ID: <shot@x>\nContent-Transfer-Encoding: base64\n\n"
        b"iVBORw0KGgo=\n--r--\n"
    )
    mail = parse(raw)
    assert [(a.inline, a.content_id) for a in mail.attachments] == [(True, "shot@x")]
    keep, skipped = select_attachments(
        mail, max_bytes=1000, max_total=1000, blocked_extensions=[".exe"]
    )
    assert [a.content_id for a in keep] == ["shot@x"] and skipped == []
