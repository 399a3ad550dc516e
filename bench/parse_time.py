"""Parse time per size class (5 KiB, 200 KiB, 10 MiB): prints figures, asserts nothing.

Run by hand: `.venv/bin/python bench/parse_time.py [--repeat N]`. Each mail is a realistic
multipart/mixed message (text/plain + HTML alternative, then base64 attachments filling it up to
the size class), parsed with `gateway.mail.parse`; the figure is the median of N runs, plus the
peak Python allocation of one parse (tracemalloc) relative to the mail's size.
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

from gateway.mail import parse

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


if __name__ == "__main__":
    main()
