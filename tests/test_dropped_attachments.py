"""When a limit drops attachments, the ticket text says how many and why."""

from __future__ import annotations

from email.message import EmailMessage

from gateway import mail as mailmod
from gateway.backends import text
from gateway.backends.text import select_attachments, ticket_text
from gateway.mail import parse


def test_the_part_limit_is_the_parsers() -> None:
    assert text.MAX_PARTS == mailmod.MAX_PARTS


def test_parts_past_the_limit_are_counted_and_named_in_the_ticket_text() -> None:
    msg = EmailMessage()
    msg["From"] = "anna@customer.example"
    msg["To"] = "support@example.com"
    msg["Subject"] = "many files"
    msg.set_content("see attached")
    for n in range(mailmod.MAX_PARTS + 10):
        msg.add_attachment(f"file {n}".encode(), maintype="text", subtype="plain",
                           filename=f"f{n}.txt")  # fmt: skip
    mail = parse(bytes(msg))
    # the root, the text part and 1998 files are examined; 12 files are not
    assert mail.parts_not_examined == (12, 12)
    assert len([a for a in mail.attachments if not a.inline]) == mailmod.MAX_PARTS - 2
    body = ticket_text(mail)
    assert (
        "12 more MIME parts (12 of them named files) were not examined: the mail has more than"
        " 2000 parts" in body
    )


def test_small_mail_says_nothing_about_parts() -> None:
    mail = parse(b"From: a@b.example\r\nSubject: x\r\n\r\nhello\r\n")
    assert mail.parts_not_examined == (0, 0)
    assert "not examined" not in ticket_text(mail)


def test_size_limits_say_how_many_and_why() -> None:
    msg = EmailMessage()
    msg["From"] = "anna@customer.example"
    msg["Subject"] = "files"
    msg.set_content("see attached")
    msg.add_attachment(b"x" * 5000, maintype="application", subtype="zip", filename="big.zip")
    msg.add_attachment(b"MZ", maintype="application", subtype="octet-stream", filename="a.exe")
    msg.add_attachment(b"ok", maintype="text", subtype="plain", filename="ok.txt")
    mail = parse(bytes(msg))
    keep, skipped = select_attachments(
        mail, max_bytes=1000, max_total=10_000, blocked_extensions=[".exe"]
    )
    assert [a.filename for a in keep] == ["ok.txt"]
    body = ticket_text(mail, not_forwarded=skipped)
    assert (
        "Attachments not forwarded (2): big.zip (too large: 5000 bytes), a.exe (blocked type)"
        in body
    )
