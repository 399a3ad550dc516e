"""Files uuencoded inside a text part (Lotus Notes, old Outlook Express and Unix `uuencode | mail`
write attachments this way): found, decoded and cut out of the text, as RT's MIME parser does.

A block counts only when it is whole: a `begin MODE NAME` line, lines that decode as uuencoding
(a length character, then the data), and an `end` line. Anything else stays text, so a customer
who writes "begin 644 ..." in a sentence loses nothing.
"""

from __future__ import annotations

import binascii
import re

_BEGIN = re.compile(r"^begin +[0-7]{3,4} +(\S.*?)[ \t]*$", re.MULTILINE)
_END = re.compile(r"^end[ \t]*$", re.MULTILINE)
MAX_FILES = 50  # blocks taken from one part (the rest stays text)


def _uu_line(line: str) -> tuple[bytes, bool]:
    """One uuencoded line and whether it was whole; raises binascii.Error when it is not one.
    Its first character gives the byte count; the characters after it must be as many as encode
    that many (up to two more: some encoders pad), all in the uuencoding alphabet. A shorter
    line has lost trailing spaces (zero bits) on the way, as mail transports strip them: padded."""
    data = line.encode("ascii")
    count = (data[0] - 32) & 63
    chars = (count + 2) // 3 * 4
    if len(data) - 1 > chars + 2 or any(not 32 <= b <= 96 for b in data):
        raise binascii.Error("not a uuencoded line")
    whole = len(data) - 1 >= chars
    padded = data[: chars + 1].ljust(chars + 1)
    try:
        return binascii.a2b_uu(padded), whole
    except binascii.Error:
        # non-zero bits past the last byte (some encoders): the characters that hold the bytes
        return binascii.a2b_uu(padded[: (count * 4 + 5) // 3]), whole


def extract_uuencoded(text: str) -> tuple[str, list[tuple[str, bytes]]]:
    """The text without its whole uuencoded blocks, and the files they held (name, bytes)."""
    if "begin" not in text:
        return text, []
    files: list[tuple[str, bytes]] = []
    kept: list[str] = []
    pos = 0
    while len(files) < MAX_FILES:
        begin = _BEGIN.search(text, pos)
        if begin is None:
            break
        end = _END.search(text, begin.end())
        if end is None:
            break
        body = text[begin.end() : end.start()].strip("\r\n").splitlines()
        try:
            lines = [_uu_line(line.rstrip("\r")) for line in body if line.strip()]
            data = b"".join(chunk for chunk, _whole in lines)
            # a whole line of data, or the zero-length line that ends a block, shows that this
            # is uuencoding (a single short line that lost its trailing spaces has only the end)
            ended = lines[-1][0] == b"" if lines else False
            if not data or not (ended or any(whole and chunk for chunk, whole in lines)):
                raise ValueError("no whole line of data")
        except (binascii.Error, UnicodeEncodeError, ValueError):
            kept.append(text[pos : end.end()])  # not uuencoding after all: text
            pos = end.end()
            continue
        kept.append(text[pos : begin.start()])
        files.append((begin.group(1).strip(), data))
        pos = end.end()
    if not files:
        return text, []
    kept.append(text[pos:])
    return "".join(kept).rstrip() + ("\n" if text.endswith("\n") else ""), files
