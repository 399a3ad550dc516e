"""Parse time per size class (5 KiB, 200 KiB, 10 MiB): prints figures, asserts nothing.

Run by hand: `.venv/bin/python bench/parse_time.py [--repeat N]`. Each mail is a realistic
multipart/mixed message (text/plain + HTML alternative, then base64 attachments filling it up to
the size class), parsed with `gateway.mail.parse`; the figure is the median of N runs, plus the
peak Python allocation of one parse (tracemalloc) relative to the mail's size.

Then HTML-only mails (a newsletter: a table of rows with links, lists, styles), whose text is
laid out by inscriptis (`gateway.mail.html`): 20 KiB, 300 KiB and 2 MiB of HTML (the last above
`MAX_HTML_PARSE`, so words only, no layout). The HTML-to-text share of the parse is printed too.
"""

from __future__ import annotations

import argparse
import base64
import os
import statistics
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.mail import html_to_text, parse

SIZES = {"5 KiB": 5 * 1024, "200 KiB": 200 * 1024, "10 MiB": 10 * 1024 * 1024}


def make_mail(size: int) -> bytes:
    text = ("Hallo Support,\n\nunser Drucker druckt nur leere Seiten. Grüße, Jörg\n" * 20).encode()
    html = b"<html><body><p>" + text.replace(b"\n", b"<br>") + b"</p></body></html>"
    head = (
        b"From: =?utf-8?q?J=C3=B6rg?= <joerg@customer.example>\r\n"
        b"To: support@example.com\r\nCc: a@customer.example, b@customer.example\r\n"
        b"Subject: =?utf-8?q?Drucker_druckt_nicht?=\r\n"
        b"Date: Mon, 10 Jun 2024 08:00:00 +0000\r\n"
        b"Message-ID: <bench@customer.example>\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="mix"\r\n\r\n'
        b'--mix\r\nContent-Type: multipart/alternative; boundary="alt"\r\n\r\n'
        b"--alt\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit"
        b"\r\n\r\n" + text.replace(b"\n", b"\r\n") + b"\r\n"
        b"--alt\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + html + b"\r\n--alt--\r\n"
    )
    parts = [head]
    remaining = size - len(head) - 20
    index = 0
    while remaining > 200:
        chunk = min(remaining * 3 // 4 - 200, 4 * 1024 * 1024)
        data = base64.encodebytes(os.urandom(max(chunk, 1))).replace(b"\n", b"\r\n")
        part = (
            b'--mix\r\nContent-Type: application/octet-stream; name="file%d.bin"\r\n'
            b'Content-Disposition: attachment; filename="file%d.bin"\r\n'
            b"Content-Transfer-Encoding: base64\r\n\r\n" % (index, index)
        ) + data
        parts.append(part)
        remaining -= len(part)
        index += 1
    parts.append(b"--mix--\r\n")
    return b"".join(parts)


HTML_SIZES = {"HTML 20 KiB": 20 * 1024, "HTML 300 KiB": 300 * 1024, "HTML 2 MiB": 2 * 1024 * 1024}


def make_html(size: int) -> str:
    """A newsletter-like HTML document of about `size` characters."""
    head = (
        "<html><head><title>News</title><style>td{padding:4px} .x{color:red}</style></head>"
        "<body><h1>Monthly report</h1><p>Hello J&ouml;rg, here is <b>your</b> overview.</p>"
        "<ul><li>first item</li><li>second &amp; third</li></ul><table>"
    )
    row = (
        '<tr><td>Order {n}</td><td><a href="https://shop.example/orders/{n}">details</a></td>'
        "<td>12&euro;</td><td><span class=x>shipped</span></td></tr>\n"
    )
    rows, n, total = [], 0, len(head)
    while total < size - 100:
        rows.append(row.format(n=n))
        total += len(rows[-1])
        n += 1
    return head + "".join(rows) + "</table><p>Regards<br>Shop</p></body></html>"


def html_mail(html: str) -> bytes:
    return (
        b"From: news@shop.example\r\nTo: support@example.com\r\nSubject: Report\r\n"
        b"Message-ID: <html-bench@shop.example>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        + html.encode()
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=0, help="runs per size (default: by size)")
    args = ap.parse_args()
    print(f"{'class':>8} {'bytes':>10} {'median ms':>10} {'min ms':>8} {'peak alloc':>11}")
    for label, size in SIZES.items():
        raw = make_mail(size)
        repeat = args.repeat or (200 if size < 100_000 else 30 if size < 1_000_000 else 5)
        parse(raw)  # warm-up (imports, caches)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            mail = parse(raw)
            times.append((time.perf_counter() - start) * 1000)
        tracemalloc.start()
        parse(raw)
        _current, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert mail.attachments or size < 10_000
        print(
            f"{label:>8} {len(raw):>10} {statistics.median(times):>10.2f} {min(times):>8.2f}"
            f" {peak / len(raw):>10.1f}x"
        )
    print(
        f"\n{'class':>12} {'bytes':>10} {'median ms':>10} {'html->text ms':>14} {'text chars':>11}"
    )
    for label, size in HTML_SIZES.items():
        html = make_html(size)
        raw = html_mail(html)
        repeat = args.repeat or (50 if size < 100_000 else 10 if size < 1_000_000 else 3)
        mail = parse(raw)
        times, conv = [], []
        for _ in range(repeat):
            start = time.perf_counter()
            parse(raw)
            times.append((time.perf_counter() - start) * 1000)
            start = time.perf_counter()
            html_to_text(html)
            conv.append((time.perf_counter() - start) * 1000)
        assert "Regards" in mail.text
        print(
            f"{label:>12} {len(raw):>10} {statistics.median(times):>10.2f}"
            f" {statistics.median(conv):>14.2f} {len(mail.text):>11}"
        )


if __name__ == "__main__":
    main()
