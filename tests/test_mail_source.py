"""A big mail is parsed and digested from the spool in pieces (a RawSource), never held whole:
the result must be exactly what parsing the same bytes gives. The piece sizes are made tiny here so
that every sample crosses many piece boundaries."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from gateway import classify, mail
from gateway.classify import content_digest
from gateway.mail import parse

SAMPLES = sorted((Path(__file__).parent / "samples").glob("*.eml"))
STDLIB = sorted((Path(os.__file__).parent / "test" / "test_email" / "data").glob("msg_*.txt"))


class BytesSource:
    """A RawSource over bytes that counts what was read."""

    def __init__(self, data: bytes) -> None:
        self.data, self.size, self.read_bytes, self.whole_reads = data, len(data), 0, 0

    def read(self, offset: int, length: int) -> bytes:
        out = self.data[offset : offset + length]
        self.read_bytes += len(out)
        self.whole_reads += offset == 0 and length >= self.size
        return out


@pytest.fixture
def tiny_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mail, "_SOURCE_HEAD", 300)
    monkeypatch.setattr(mail, "_LINESEP_WINDOW", 64)
    monkeypatch.setattr(mail, "_FEED_CHUNK", 97)
    monkeypatch.setattr(classify, "_DIGEST_HEAD", 1024)
    monkeypatch.setattr(classify, "_DIGEST_PIECE", 61)


def _outcome(raw: bytes | BytesSource) -> object:
    try:
        return parse(raw)
    except Exception as exc:  # ParseError must be the same too
        return (type(exc).__name__, str(exc))


@pytest.mark.parametrize("path", SAMPLES + STDLIB, ids=lambda p: p.name)
def test_parse_and_digest_from_pieces_equal_the_whole(path: Path, tiny_pieces: None) -> None:
    raw = path.read_bytes()
    src = BytesSource(raw)
    assert _outcome(src) == _outcome(raw)
    assert content_digest(BytesSource(raw)) == content_digest(raw)
    if len(raw) > 2000:
        assert src.whole_reads == 0  # parsed from pieces, never materialised


def test_boundary_flood_is_cut_at_the_same_place(
    tiny_pieces: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mail, "MAX_BOUNDARY_LINES", 20)
    raw = (
        b"From: a@example.org\r\nSubject: flood\r\nContent-Type: multipart/mixed; boundary=x\r\n\r\n"
        + b"".join(b"--x\r\nContent-Type: text/plain\r\n\r\npart %d\r\n" % i for i in range(60))
        + b"--x--\r\n"
    )
    whole, pieces = parse(raw), parse(BytesSource(raw))
    assert whole == pieces
    assert any("boundary lines" in d for d in whole.defects)


def test_big_mail_is_read_in_pieces_and_parsed_the_same() -> None:
    blobs = [os.urandom(700_000 + i) for i in range(3)]
    parts = b"".join(
        b"--b\r\nContent-Type: application/octet-stream; name=f%d.bin\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        % i
        + base64.encodebytes(blob).replace(b"\n", b"\r\n")
        for i, blob in enumerate(blobs)
    )
    raw = (
        b"From: Big <big@example.org>\r\nSubject: big\r\nMessage-ID: <big@example.org>\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="b"\r\n\r\n'
        b"--b\r\nContent-Type: text/plain\r\n\r\nhello\r\n" + parts + b"--b--\r\n"
    )
    src = BytesSource(raw)
    assert parse(src) == parse(raw)
    assert [a.data for a in parse(src).attachments] == blobs
    src.read_bytes = 0
    assert content_digest(src) == content_digest(raw)
    assert src.read_bytes < 2 * len(raw)  # pieces, not the whole read again and again
