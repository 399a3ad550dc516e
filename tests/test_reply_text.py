"""Reply text: a reply's new text first, its quoted history and signature folded below a marker.

The replies in tests/samples/replies/ are written the way each client writes them (Outlook desktop,
Gmail, Apple Mail, Thunderbird: multipart/alternative with their own plain-text and HTML quoting);
each quotes our acknowledgement and carries a signature. No customer data.
"""

from __future__ import annotations

import re
import smtplib
import uuid
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from gateway.backends.text import QUOTED_FILE, QUOTED_MARKER, reply_view
from gateway.mail import parse
from gateway.mail.reply import split_text
from tests.harness import DaemonProcess, SimProcess, wait_for, write_config

REPLIES = Path(__file__).parent / "samples" / "replies"
CLIENTS = ("outlook", "gmail", "apple", "thunderbird")
NEW = "The printer works again after the driver update, thank you!"
ACK_TEXT = "thank you for your message. We have opened ticket"


def reply(client: str, *, html_only: bool = False, **values: str) -> bytes:
    text = (REPLIES / f"{client}.eml.tmpl").read_text()
    defaults = {
        "sender": "carla@example.org",
        "to": "support@example.com",
        "ref": "1234",
        "subject": "Printer offline",
        "mid": uuid.uuid4().hex,
        "ack_mid": "ack-1@ticket-gateway.localdomain",
    }
    for key, value in {**defaults, **values}.items():
        text = text.replace("{" + key + "}", value)
    if html_only:  # the same client configured to send HTML only
        text = re.sub(
            r"--[^\n]+\nContent-Type: text/plain.*?(?=\n--)", "", text, count=1, flags=re.S
        )
        assert "text/plain" not in text
    return text.encode()


@pytest.mark.parametrize("html_only", [False, True], ids=["plain+html", "html-only"])
@pytest.mark.parametrize("client", CLIENTS)
def test_each_clients_reply_is_split_into_new_text_signature_and_quote(
    client: str, html_only: bool
) -> None:
    mail = parse(reply(client, html_only=html_only))
    assert mail.new_text.startswith(NEW)
    assert ACK_TEXT not in mail.new_text and ACK_TEXT in mail.quoted_text
    assert "Support" in mail.quoted_text.split("\n", 1)[0]  # the attribution / header opens it
    if client == "outlook":  # Outlook's signature is plain text above its header block
        assert mail.new_text.endswith("Example Org | +1 555 0100")
        assert mail.signature == ""
    else:
        assert mail.new_text.removesuffix("\n\nCarla") == NEW
        assert mail.signature.startswith("--") and "Example Org" in mail.signature
        assert "wrote" not in mail.signature
    assert mail.text  # the body as it came is still there, whole


OUTLOOK_LOCALIZED = {
    "de-owa": """Danke, der Drucker geht wieder.

Viele Grüße
Max Kunde

________________________________
Von: Support <support@example.com>
Gesendet: Montag, 2. März 2026 10:15
An: Max Kunde <max@kunde.example.org>
Betreff: [Ticket #1234] Drucker offline

Hallo Max Kunde,
""",
    "fr-desktop": """Merci, l'imprimante fonctionne de nouveau.

Cordialement,
Marie

De : Support <support@example.com>
Envoyé : lundi 2 mars 2026 10:15
À : Marie Client <marie@client.example.fr>
Objet : [Ticket #1234] Imprimante hors ligne

Bonjour Marie,
""",
    "sv-separator": """Tack, det fungerar nu.

-----Ursprungligt meddelande-----
Från: Support <support@example.com>
Skickat: den 2 mars 2026 10:15
Till: Karin <karin@kund.example.se>
Ämne: [Ticket #1234] Skrivaren

Hej Karin,
""",
    "nl-wrote": """Bedankt, het werkt weer.

Op ma 2 mrt 2026 om 10:15 schreef Support <support@example.com>:
> Hallo Jan,
""",
    "fi-wrote": """Kiitos, toimii taas.

ma 2. maalisk. 2026 klo 10.15 Support <support@example.com> kirjoitti:
> Hei Matti,
""",
    "de-mobile": """Geht wieder, danke!

Von meinem iPhone gesendet

> Am 02.03.2026 um 10:15 schrieb Support <support@example.com>:
>
> Hallo Max,
""",
}


@pytest.mark.parametrize("name", list(OUTLOOK_LOCALIZED))
def test_localized_quote_headers_and_mobile_signatures(name: str) -> None:
    text = OUTLOOK_LOCALIZED[name]
    split = split_text(text)
    first_line = text.split("\n", 1)[0]
    assert split.new.split("\n", 1)[0] == first_line
    assert "Support <support@example.com>" in split.quoted
    assert "support@example.com" not in split.new
    if name == "de-mobile":
        assert split.new == first_line and split.signature == "Von meinem iPhone gesendet"


def test_what_is_not_split() -> None:
    interleaved = "Hi,\n\n> Which model is it?\nThe HP 4000.\n\n> Which floor?\nThird.\n"
    assert not split_text(interleaved).found
    plain = "Hello,\n\nmy colleague wrote: the printer is broken.\nFrom: the third floor\n"
    assert not split_text(plain).found
    underscores = "Total\n______________________\n42 items\n"
    assert not split_text(underscores).found
    mail = parse(b"From: a@example.org\nSubject: x\n\nJust a question, no quote.\n")
    assert (mail.new_text, mail.signature, mail.quoted_text) == ("", "", "")


def test_a_long_html_only_mail_is_not_cut_into_new_text_and_quote() -> None:
    # quotequail's own default quotes everything past 1,000 lines; a long mail is no reply
    rows = "".join(f"<tr><td>Order {n}</td><td>shipped</td></tr>\n" for n in range(1500))
    raw = (
        "From: a@example.org\nSubject: report\nContent-Type: text/html; charset=utf-8\n\n"
        f"<html><body><p>Monthly report</p><table>{rows}</table><p>Regards</p></body></html>\n"
    ).encode()
    mail = parse(raw)
    assert (mail.new_text, mail.quoted_text) == ("", "")
    assert "Order 1499" in mail.text and mail.text.endswith("Regards")


def test_the_modes_of_a_backend() -> None:
    mail = parse(reply("gmail"))
    folded = reply_view(mail, "fold", followup=True)
    before, marker, after = folded.text.partition(QUOTED_MARKER)
    assert marker and before.strip() == NEW
    assert after.lstrip("\n").startswith("-- \nCarla Customer") and ACK_TEXT in after
    assert folded.html == ""  # the HTML still holds the history: not sent when folded
    dropped = reply_view(mail, "drop", followup=True)
    assert dropped.text.startswith(NEW + "\n\n[quoted text and signature left out")
    assert ACK_TEXT not in dropped.text
    # a new ticket never loses the history: drop folds there
    assert reply_view(mail, "drop", followup=False).text == folded.text
    attached = reply_view(mail, "attach", followup=True)
    assert attached.text.startswith(NEW + "\n\n[quoted text and signature attached")
    files = {a.filename: a.data for a in attached.attachments}
    assert (
        ACK_TEXT.encode() in files[QUOTED_FILE] and b"gmail_quote" in files["original-message.html"]
    )
    assert reply_view(mail, "keep", followup=True) is mail
    # a new ticket with only a signature stays as it came
    signed = parse(b"From: a@example.org\nSubject: x\n\nHello\n\n-- \nA. Person\n")
    assert signed.signature and reply_view(signed, "fold", followup=False) is signed


# -- end to end: a follow-up in each of the four systems -------------------------------------

SYSTEMS = {
    "support@example.com": ("superoffice-soap", "outlook"),
    "sales@example.com": ("superoffice-rest", "gmail"),
    "hosting@example.com": ("interserver", "apple"),
    "billing@example.com": ("whmcs", "thunderbird"),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SimProcess, DaemonProcess]]:
    tmp = tmp_path_factory.mktemp("replies")
    sim = SimProcess(tmp)
    sim.start()
    cfg = write_config(tmp / "gw", sim_http=sim.http_port, sim_smtp=sim.smtp_port)
    daemon = DaemonProcess(cfg)
    daemon.start()
    yield sim, daemon
    daemon.stop()
    sim.stop()


def body_without_header_block(body: str) -> str:
    lines = body.split("\n")
    i = 0
    while i < len(lines) and re.match(r"^(From|To|Cc|Date|Sender|E-mail|Email): ", lines[i]):
        i += 1
    return "\n".join(lines[i:]).lstrip("\n")


@pytest.mark.parametrize("rcpt", list(SYSTEMS))
def test_a_clients_reply_to_our_ack_becomes_a_follow_up_with_the_new_text_first(
    stack: tuple[SimProcess, DaemonProcess], rcpt: str
) -> None:
    sim, daemon = stack
    system, client = SYSTEMS[rcpt]
    subject = f"Printer offline {uuid.uuid4().hex[:6]}"
    first = EmailMessage()
    first["From"] = "Carla Customer <carla@example.org>"
    first["To"] = rcpt
    first["Subject"] = subject
    first["Message-ID"] = f"<{uuid.uuid4().hex}@example.org>"
    first.set_content("The printer on floor 3 is offline.")
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as s:
        s.send_message(first)
    t = wait_for(lambda: next((x for x in sim.get("/_sim/tickets") if x["title"] == subject), None))
    assert t and t["system"] == system
    acks = wait_for(
        lambda: [m for m in sim.get("/_sim/outbox") if f"[Ticket #{t['ref']}]" in m["subject"]]
    )
    ack = acks[0]
    raw = reply(
        client,
        to=rcpt,
        ref=str(t["ref"]),
        subject=subject,
        ack_mid=ack["headers"]["Message-ID"].strip("<>"),
    )
    with smtplib.SMTP("127.0.0.1", daemon.smtp_port, timeout=30) as s:
        s.sendmail("carla@example.org", [rcpt], raw)

    def two_messages() -> dict | None:  # type: ignore[type-arg]
        cur = next((x for x in sim.get("/_sim/tickets") if x["title"] == subject), None)
        return cur if cur and len(cur["messages"]) >= 2 else None

    t2 = wait_for(two_messages)
    assert t2, daemon.log.read_text()[-3000:]
    body = t2["messages"][-1]["body"]
    shown = body_without_header_block(body)
    assert shown.startswith(NEW), body
    new, marker, folded = shown.partition(QUOTED_MARKER)
    assert marker, body
    assert ACK_TEXT not in new and ACK_TEXT in folded
    assert "Example Org" in (folded if client != "outlook" else new)
