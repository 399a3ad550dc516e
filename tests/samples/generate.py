"""Writes the sample messages that cannot be typed by hand (binary, huge or deeply nested).

Run from anywhere: `python tests/samples/generate.py`. The output is committed next to this
script, so the tests do not depend on running it; it documents how those samples were made.
The hand-written samples (*.eml without a generator entry here) are edited directly.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).parent


def _tnef_object(level: int, attr_id: int, data: bytes) -> bytes:
    """One TNEF attribute: level, attribute id (type << 16 | name), length, data, checksum."""
    checksum = sum(data) & 0xFFFF
    return struct.pack("<BIi", level, attr_id, len(data)) + data + struct.pack("<H", checksum)


def tnef_blob(files: list[tuple[str, bytes]], body: bytes = b"") -> bytes:
    out = [struct.pack("<IH", 0x223E9F78, 0x0001)]
    out.append(_tnef_object(1, 0x00089006, struct.pack("<I", 0x00010000)))  # attTnefVersion
    out.append(_tnef_object(1, 0x00069007, struct.pack("<II", 1252, 0)))  # attOemCodepage
    out.append(_tnef_object(1, 0x00078008, b"IPM.Microsoft Mail.Note\x00"))  # attMessageClass
    if body:
        out.append(_tnef_object(1, 0x0002800C, body))  # attBody
    for name, data in files:
        out.append(_tnef_object(2, 0x00069002, b"\x01\x00\xff\xff\xff\xff" + b"\x00" * 8))
        out.append(_tnef_object(2, 0x00018010, name.encode("cp1252") + b"\x00"))  # attAttachTitle
        out.append(_tnef_object(2, 0x0006800F, data))  # attAttachData
    return b"".join(out)


def _b64(data: bytes) -> bytes:
    return base64.encodebytes(data)


def tnef_winmail() -> bytes:
    blob = tnef_blob(
        [("report.pdf", b"%PDF-1.4 fake report\n"), ("budget.xlsx", b"PK\x03\x04 fake sheet")],
        body=b"Body inside TNEF",
    )
    return (
        b"From: Outlook User <outlook@customer.example>\r\n"
        b"To: support@example.com\r\n"
        b"Subject: Files from Outlook\r\n"
        b"Date: Mon, 10 Jun 2024 08:00:00 +0000\r\n"
        b"Message-ID: <tnef-1@customer.example>\r\n"
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="t"\r\n\r\n'
        b"--t\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nSee the two files.\r\n"
        b'--t\r\nContent-Type: application/ms-tnef; name="winmail.dat"\r\n'
        b'Content-Disposition: attachment; filename="winmail.dat"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + _b64(blob).replace(b"\n", b"\r\n")
        + b"--t--\r\n"
    )


def tnef_broken() -> bytes:
    blob = tnef_blob([("lost.doc", b"x" * 40)])[:45]  # cut in the middle of an attribute
    blob = blob[:30] + b"\xff\xff\xff\x7f" + blob[34:]  # and an absurd length
    return (
        b"From: outlook@customer.example\n"
        b"To: support@example.com\n"
        b"Subject: broken winmail.dat\n"
        b"Date: Mon, 10 Jun 2024 08:00:00 +0000\n"
        b"Message-ID: <tnef-2@customer.example>\n"
        b"MIME-Version: 1.0\n"
        b'Content-Type: multipart/mixed; boundary="t"\n\n'
        b"--t\nContent-Type: text/plain\n\nThe attachment is damaged.\n"
        b'--t\nContent-Type: application/ms-tnef; name="winmail.dat"\n'
        b"Content-Transfer-Encoding: base64\n\n" + _b64(blob) + b"--t--\n"
    )


def iso2022jp() -> bytes:
    body = "お問い合わせありがとうございます。\n半角ｶﾀｶﾅも使います。\n".encode("iso2022_jp_ext")
    subject = base64.b64encode("注文について".encode("iso2022_jp")).decode()
    name = base64.b64encode("山田".encode("iso2022_jp"))
    return (
        b"From: =?ISO-2022-JP?B?" + name + b"?= <yamada@customer.example>\n"
        b"To: support@example.com\n"
        b"Subject: =?ISO-2022-JP?B?" + subject.encode() + b"?=\n"
        b"Date: Mon, 10 Jun 2024 08:00:00 +0900\n"
        b"Message-ID: <jis-1@customer.example>\n"
        b"MIME-Version: 1.0\n"
        b"Content-Type: text/plain; charset=ISO-2022-JP\n"
        b"Content-Transfer-Encoding: 7bit\n\n" + body
    )


def raw8bit_cp1252_headers() -> bytes:
    return (
        b"From: Andr\xe9 Dupr\xe9 <andre@customer.example>\n"
        b"To: support@example.com\n"
        b"Subject: Probl\xe8me de facture \x96 urgent\n"
        b"Date: Mon, 10 Jun 2024 08:00:00 +0000\n"
        b"Message-ID: <raw8bit-1@customer.example>\n"
        b"Content-Type: text/plain\n\n"
        b"Le montant est de 100 \x80.\n"
    )


def deeply_nested(depth: int = 60) -> bytes:
    out = [
        b"From: nest@customer.example\nTo: support@example.com\nSubject: deeply nested\n"
        b"Message-ID: <nested-1@customer.example>\nMIME-Version: 1.0\n"
    ]
    for i in range(depth):
        out.append(b'Content-Type: multipart/mixed; boundary="n%d"\n\n--n%d\n' % (i, i))
    out.append(b"Content-Type: text/plain\n\nthe innermost text\n")
    for i in reversed(range(depth)):
        out.append(b"--n%d--\n" % i)
    # a readable part at the top, after the nested one
    return b"".join(out)


def large_headers() -> bytes:
    received = b"".join(
        b"Received: from relay%d.example.net (relay%d.example.net [198.51.100.%d])\n"
        b"\tby relay%d.example.net with ESMTP id %08d; Mon, 10 Jun 2024 08:00:00 +0000\n"
        % (i, i, i % 250, i + 1, i)
        for i in range(1000)
    )
    junk = b"X-Junk: " + b" ".join(b"token%06d" % i for i in range(20000)) + b"\n"
    return (
        received
        + b"From: big@customer.example\nTo: support@example.com\nSubject: huge header section\n"
        b"Message-ID: <large-headers-1@customer.example>\n"
        b"Date: Mon, 10 Jun 2024 08:00:00 +0000\n"
        + junk
        + b"Auto-Submitted: no\nX-Priority: 1\n\nSmall body.\n"
    )


def many_recipients(count: int = 3000) -> bytes:
    to = b",\n ".join(b'"User %d" <user%d@customer.example>' % (i, i) for i in range(count))
    cc = b", ".join(b"cc%d@customer.example" % i for i in range(count))
    return (
        b"From: mass@customer.example\nTo: " + to + b"\nCc: " + cc + b"\n"
        b"Subject: thousands of recipients\nMessage-ID: <many-1@customer.example>\n"
        b"Date: Mon, 10 Jun 2024 08:00:00 +0000\n\nHello everyone.\n"
    )


_DUP_BODY = (
    b"From: Jane <jane@customer.example>\n"
    b"To: support@example.com\n"
    b"Subject: Printer\n"
    b"Date: Mon, 3 Jun 2024 09:11:58 +0200\n"
    b"Message-ID: <dup-1@customer.example>\n"
    b"\n"
    b"The printer prints empty pages.\n"
    b"Regards, Jane\n"
)


def duplicate_route_a() -> bytes:
    trace = (
        b"Return-Path: <jane@customer.example>\n"
        b"Delivered-To: support@example.com\n"
        b"Received: from mx1.example.com by mail.example.com; Mon, 3 Jun 2024 09:12:01 +0200\n"
        b"X-Gateway-Intake: smtp\n"
        b"DKIM-Signature: v=1; a=rsa-sha256; d=customer.example; s=s1; b=AAAA\n"
    )
    return (trace + _DUP_BODY).replace(b"\n", b"\r\n")


def duplicate_route_b() -> bytes:
    trace = (
        b"Return-Path: <bounce+jane=customer.example@relay.example>\n"
        b"Received: from mx2.example.com by imap.example.com; Mon, 3 Jun 2024 09:12:09 +0200\n"
        b"Received: from mx1.example.com by mx2.example.com; Mon, 3 Jun 2024 09:12:05 +0200\n"
        b"ARC-Seal: i=1; a=rsa-sha256; d=relay.example; s=arc; b=BBBB\n"
        b"Authentication-Results: mx2.example.com; dkim=pass\n"
        b"Delivered-To: sales@example.com\n"
    )
    # refolded Subject, trailing white space on a line, LF line ends
    body = _DUP_BODY.replace(b"Subject: Printer\n", b"Subject:\n Printer\n").replace(
        b"pages.\n", b"pages.  \n"
    )
    return trace + body


GENERATED: dict[str, Callable[[], bytes]] = {
    "tnef_winmail.eml": tnef_winmail,
    "tnef_broken.eml": tnef_broken,
    "iso2022jp.eml": iso2022jp,
    "raw8bit_cp1252_headers.eml": raw8bit_cp1252_headers,
    "deeply_nested.eml": deeply_nested,
    "large_headers.eml": large_headers,
    "many_recipients.eml": many_recipients,
    "duplicate_route_a.eml": duplicate_route_a,
    "duplicate_route_b.eml": duplicate_route_b,
}


def main() -> None:
    for name, make in GENERATED.items():
        (HERE / name).write_bytes(make())
        print(name)


if __name__ == "__main__":
    main()
