"""What an acknowledgement looks like on the wire: read back with the standard library's parser."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

from gateway.ack import Template, build_ack
from gateway.models import ParsedMail

TEMPLATE = Template(
    "t", "Subject: {token} Re: {subject_full}\n\nHello {sender_name},\n\nticket {ref}.\n.\nBye\n"
)


def build(mail: ParsedMail, template: Template = TEMPLATE, **kw: str) -> tuple[EmailMessage, bytes]:
    args = {
        "rcpt": "anna@example.org",
        "ref": "1234",
        "token": "[Ticket #1234]",
        "from_address": "support@example.com",
        "from_name": "Support Désk",
        "hostname": "gw.example.com",
        "backend": "superoffice-soap",
    }
    args.update(kw)
    data, msg_id = build_ack(template, mail, **args)  # type: ignore[arg-type]
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    assert msg["Message-ID"] == f"<{msg_id}>"
    return msg, data


def test_ascii_reply_threads_to_the_original_and_says_it_is_automatic() -> None:
    mail = ParsedMail(
        message_id="orig@example.org",
        references=("a@x", "b@x"),
        subject="Printer broken",
        from_addr="anna@example.org",
        from_name="Anna",
    )
    msg, data = build(mail)
    assert msg["Subject"] == "[Ticket #1234] Re: Printer broken"
    assert msg["To"] == "anna@example.org"
    assert msg["In-Reply-To"] == "<orig@example.org>"
    assert msg["References"].split() == ["<a@x>", "<b@x>", "<orig@example.org>"]
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["Precedence"] == "auto_reply"
    assert msg["X-Auto-Response-Suppress"] == "All"
    assert msg["From"].addresses[0].display_name == "Support Désk"
    assert msg["From"].addresses[0].addr_spec == "support@example.com"
    assert msg.get_content().replace("\r\n", "\n") == "Hello Anna,\n\nticket 1234.\n.\nBye\n"
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF line ends only
    assert not msg.defects


def test_non_ascii_subject_and_body_are_encoded_and_decode_back() -> None:
    mail = ParsedMail(subject="Größe ändern — 端末 " * 6, from_name="Jürgen Ærøskøbing")
    msg, data = build(mail)
    assert data.isascii()
    assert msg["Subject"] == "[Ticket #1234] Re: " + " ".join(("Größe ändern — 端末 " * 6).split())
    assert "Jürgen Ærøskøbing" in msg.get_content()
    assert all(len(line) <= 78 for line in data.split(b"\r\n"))


def test_many_references_are_folded_and_limited() -> None:
    refs = tuple(f"reference-{i}-{'x' * 30}@mail.example.org" for i in range(30))
    msg, data = build(ParsedMail(message_id="last@example.org", references=refs))
    got = msg["References"].split()
    assert got == [f"<{r}>" for r in refs[-10:]] + ["<last@example.org>"]
    head = data.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 78 for line in head.split(b"\r\n"))


def test_crafted_message_id_cannot_add_headers() -> None:
    mail = ParsedMail(message_id="x@y>\r\nBcc: victim@example.net\r\nX-A: <z", subject="hi")
    msg, _ = build(mail)
    assert msg["Bcc"] is None
    assert msg["X-A"] is None


def test_missing_subject_and_empty_template_body() -> None:
    msg, _ = build(ParsedMail(), Template("t", "Subject: ack\n\n"))
    assert msg["Subject"] == "[Ticket #1234] ack"  # the token is always there
    assert msg.get_content() == ""


def _plain_policy_bytes(
    policy: email.policy.EmailPolicy, headers: list[tuple[str, str]], body: str
) -> bytes:
    msg = EmailMessage(policy=policy)
    for name, value in headers:
        msg[name] = value
    msg.set_content(body, charset="utf-8")
    return msg.as_bytes()


def test_shared_header_objects_write_what_the_standard_policies_write() -> None:
    """The acknowledgement policies (header classes made once, shared header objects) write
    byte for byte what email.policy.SMTP / SMTPUTF8 write, message after message."""
    from gateway.ack import SMTP_7BIT, SMTPUTF8

    cases = [
        ([("To", "anna@example.org"), ("Subject", "Re: " + "ä" * 300)], "Grüße\n" * 3),
        ([("To", "bob@example.org"), ("Subject", "plain")], "plain text\n"),
        ([("To", "jürgen@exämple.org"), ("Subject", "x" * 5000)], "long " + "y" * 2000 + "\n"),
    ]
    for _ in range(2):  # the second round reuses what the first made
        for headers, body in cases:
            common = [*headers, ("Auto-Submitted", "auto-replied"), ("Precedence", "auto_reply")]
            assert _plain_policy_bytes(SMTP_7BIT, common, body) == _plain_policy_bytes(
                email.policy.SMTP.clone(cte_type="7bit"), common, body
            )
            assert _plain_policy_bytes(SMTPUTF8, common, body) == _plain_policy_bytes(
                email.policy.SMTPUTF8, common, body
            )


def test_each_ack_gets_its_own_encoding_and_addresses() -> None:
    """Shared header objects never carry one acknowledgement's values into the next."""
    ascii_msg, _ = build(ParsedMail(subject="hello", from_name="Anna"))
    utf8_msg, _ = build(ParsedMail(subject="héllo " * 40, from_name="Jürgen"))
    again, _ = build(ParsedMail(subject="hello", from_name="Anna"), rcpt="other@example.net")
    assert ascii_msg["Content-Transfer-Encoding"] == "7bit"
    assert utf8_msg["Content-Transfer-Encoding"] in ("quoted-printable", "base64")
    assert again["Content-Transfer-Encoding"] == "7bit"
    assert again["To"] == "other@example.net" and ascii_msg["To"] == "anna@example.org"
    assert ascii_msg["Message-ID"] != again["Message-ID"]
