"""Charsets: bytes and a declared charset label in, text out (`decode_bytes`); never raises.

The repairs are listed in the package docstring (cp1252 for Latin-1 labels, supersets for
known-weak labels, UTF-8 / Windows-1252 for undeclared 8-bit data)."""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import re
from collections.abc import Iterable, Iterator

import charset_normalizer

from gateway.mail.defects import _Defects


def _c1_fallback(err: UnicodeError) -> tuple[str, int]:
    """cp1252 leaves five bytes undefined; map them as ISO-8859-1 does (as browsers do)."""
    if not isinstance(err, UnicodeDecodeError):
        raise err
    return err.object[err.start : err.end].decode("latin-1"), err.end


codecs.register_error("gateway.c1", _c1_fallback)

_LATIN1_LABELS = frozenset(
    {"iso-8859-1", "iso8859-1", "iso_8859-1", "iso_8859-1:1987", "latin1", "latin-1", "l1",
     "iso-ir-100", "cp819", "ibm819", "csisolatin1", "8859-1", "iso8859_1", "windows-1252",
     "cp1252", "x-cp1252"}
)  # fmt: skip
_ASCII_LABELS = frozenset(
    {"us-ascii", "ascii", "ansi_x3.4-1968", "iso646-us", "us", "646", "csascii", "iso-ir-6",
     "", "unknown-8bit", "x-unknown", "unknown", "x-user-defined", "default", "charset",
     "none", "8bit", "7bit", "binary", "text/plain", "us-ascii;"}
)  # fmt: skip
# ISO-2022-JP as Windows writes it (CP50220/50221: NEC row 13 such as ①, IBM extensions) has no
# Python codec: `_decode_cp5022x` reads the JIS X 0208 runs through cp932, which has them.
_CP5022X = "gateway-cp5022x"
_ISO2022JP = ("iso2022_jp", _CP5022X, "iso2022_jp_ext", "iso2022_jp_2", "iso2022_jp_2004",
              "iso2022_jp_3")  # fmt: skip
_SJIS = ("cp932", "shift_jis_2004")
_GB = ("gb18030",)
_BIG5 = ("big5hkscs", "cp950")
_KR = ("cp949",)
_CHAINS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("iso-2022-jp", "iso2022jp", "csiso2022jp", "iso-2022-jp-1", "iso-2022-jp-2",
                     "iso-2022-jp-3", "iso-2022-jp-2004", "cp50220", "cp50221", "cp50222"),
                    _ISO2022JP),
    **dict.fromkeys(("shift_jis", "shift-jis", "sjis", "x-sjis", "ms_kanji", "windows-31j",
                     "csshiftjis", "cp932", "ms932"), _SJIS),
    **dict.fromkeys(("euc-jp", "eucjp", "x-euc-jp", "cseucpkdfmtjapanese"),
                    ("euc_jp", "euc_jis_2004")),
    **dict.fromkeys(("gb2312", "gbk", "x-gbk", "cp936", "euc-cn", "csgb2312", "gb_2312-80",
                     "chinese", "gb18030", "x-euc-cn"), _GB),
    **dict.fromkeys(("big5", "big5-hkscs", "cn-big5", "x-x-big5", "csbig5", "cp950"), _BIG5),
    **dict.fromkeys(("ks_c_5601-1987", "ks_c_5601", "euc-kr", "korean", "ksc5601", "ksc_5601",
                     "csksc56011987", "cseuckr", "cp949", "windows-949"), _KR),
    **dict.fromkeys(("tis-620", "iso-8859-11", "windows-874", "cp874", "x-windows-874"),
                    ("cp874",)),
    **dict.fromkeys(("iso-8859-8-i", "iso-8859-8-e", "csiso88598i"), ("iso8859_8",)),
    **dict.fromkeys(("iso-8859-6-i", "iso-8859-6-e"), ("iso8859_6",)),
    **dict.fromkeys(("iso-8859-9", "iso8859-9", "latin5", "l5", "windows-1254"), ("cp1254",)),
    **dict.fromkeys(("unicode-1-1-utf-7", "utf-7", "csunicode11utf7"), ("utf_7",)),
    **dict.fromkeys(("x-mac-roman", "macintosh", "mac", "csmacintosh"), ("mac_roman",)),
    **dict.fromkeys(("unicode", "ucs-2", "utf-16"), ("utf_16",)),
    **dict.fromkeys(("utf8", "utf-8", "x-utf-8", "unicode-1-1-utf-8", "unicode-2-0-utf-8"),
                    ("utf_8",)),
}  # fmt: skip
# Codecs Python knows but that must never decode mail text.
_FORBIDDEN_CODECS = frozenset(
    {"unicode-escape", "raw-unicode-escape", "idna", "punycode", "undefined", "mbcs", "oem",
     "palmos", "utf-8-sig", "unicode_internal"}
)  # fmt: skip
# Codecs whose output may contain lone surrogates (not Unicode text; breaks UTF-8 sinks).
_SURROGATE_PRONE = frozenset({"utf-7", "utf-16", "utf-16-le", "utf-16-be", "utf-32",
                              "utf-32-le", "utf-32-be"})  # fmt: skip
_SURROGATES = re.compile("[\ud800-\udfff]")
_UTF8_MULTIBYTE = re.compile(rb"[\xc2-\xf4][\x80-\xbf]")
_codec_cache: dict[str, str | None] = {}


def _codec(label: str) -> str | None:
    """Python codec name for a charset label, or None when unknown or unusable."""
    try:
        return _codec_cache[label]
    except KeyError:
        pass
    name: str | None
    info: codecs.CodecInfo | None
    try:
        info = codecs.lookup(label)
    except (LookupError, ValueError, TypeError):
        # "latin-9", "cp-1252", "shift-jis": a known name written with a separator inside
        squeezed = label.replace("-", "").replace("_", "").replace(" ", "")
        try:
            info = codecs.lookup(squeezed) if squeezed != label else None
        except (LookupError, ValueError, TypeError):
            info = None
    if info is None:
        name = None
    else:
        name = info.name
        if name in _FORBIDDEN_CODECS or not getattr(info, "_is_text_encoding", True):
            name = None
    if len(_codec_cache) < 512:
        _codec_cache[label] = name
    return name


def _norm_label(label: str | None) -> str | None:
    if label is None:
        return None
    return label.strip().strip("\"'").strip().lower()


def _decode_cp1252(data: bytes) -> str:
    return data.decode("cp1252", "gateway.c1")


# The site's `[mail] fallback_charsets`, for the duration of one `parse` call (see `fallbacks`).
_FALLBACKS: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "gateway_mail_fallback_charsets", default=()
)
# What the detector may answer: legacy charsets that mail without a label is really sent in.
_DETECTABLE = ["cp1252", "koi8_r", "koi8_u", "cp1251", "cp1250", "iso8859_2", "iso8859_15",
               "cp1253", "cp1254", "cp1257", "iso8859_7", "cp866", "mac_cyrillic", "shift_jis",
               "euc_jp", "gb18030", "big5", "euc_kr"]  # fmt: skip
_DETECT_MIN = 48  # bytes: shorter text is too little for a detector (it guesses)
_DETECT_MAX = 64 * 1024  # bytes given to the detector
_DETECT_COHERENCE = 0.2  # the detector must recognise a language in the result this well


@contextlib.contextmanager
def fallbacks(charsets: Iterable[str]) -> Iterator[None]:
    """Within the block, undeclared 8-bit text that is not UTF-8 is tried in `charsets` (in
    order, the first that decodes it wins) before the detector and Windows-1252."""
    token = _FALLBACKS.set(tuple(c for c in (_codec(x.strip().lower()) for x in charsets) if c))
    try:
        yield
    finally:
        _FALLBACKS.reset(token)


def _decode_guess(data: bytes) -> tuple[str, str]:
    """8-bit data without a usable label: UTF-8 when valid; else the site's fallback charsets;
    else what charset-normalizer detects with confidence; else Windows-1252."""
    try:
        return data.decode("utf-8"), "UTF-8"
    except UnicodeDecodeError:
        pass
    for codec in _FALLBACKS.get():
        try:
            return data.decode(codec), codec
        except UnicodeDecodeError:
            continue
    if len(data) >= _DETECT_MIN:
        try:
            best = charset_normalizer.from_bytes(
                data[:_DETECT_MAX], cp_isolation=_DETECTABLE
            ).best()
        except Exception:  # the detector must never cost the mail
            best = None
        if best is not None and best.coherence >= _DETECT_COHERENCE:
            found = _codec(best.encoding)
            if found is not None and found != "cp1252":
                try:
                    return data.decode(found), f"{found} (detected)"
                except (UnicodeDecodeError, LookupError):
                    pass
    return _decode_cp1252(data), "windows-1252"


def decode_bytes(data: bytes, label: str | None) -> tuple[str, str | None]:
    """Decode text `data` declared as charset `label`; never raises.

    Returns the text and, when the declaration could not be followed, a short note saying how
    the text was decoded instead.
    """
    if not data:
        return "", None
    lab = _norm_label(label)
    if lab is None or lab in _ASCII_LABELS:
        if data.isascii():
            return data.decode("ascii"), None
        text, how = _decode_guess(data)
        what = "no charset" if lab is None else f"charset {label!r}"
        return text, f"{what} but 8-bit data: decoded as {how}"
    if lab in _LATIN1_LABELS:
        if data.isascii():
            return data.decode("ascii"), None
        if lab not in ("windows-1252", "cp1252", "x-cp1252") and _UTF8_MULTIBYTE.search(data):
            try:
                return data.decode("utf-8"), f"charset {label!r} but the data is UTF-8"
            except UnicodeDecodeError:
                pass
        return _decode_cp1252(data), None
    chain = _CHAINS.get(lab)
    if chain is None:
        codec = _codec(lab)
        if codec is None:
            # a label nobody knows ("x-unknown-8bit", a typo) says no more than no label
            text, how = (data.decode("ascii"), "ASCII") if data.isascii() else _decode_guess(data)
            return text, f"unknown charset {label!r}: decoded as {how}"
        chain = (codec,)
    if chain[0] == "utf_8":
        try:
            return data.decode("utf-8"), None
        except UnicodeDecodeError:
            if not _UTF8_MULTIBYTE.search(data):
                # No valid multi-byte sequence at all: legacy 8-bit text mislabelled as UTF-8.
                return _decode_cp1252(
                    data
                ), f"charset {label!r} but not UTF-8: decoded as windows-1252"
            return data.decode("utf-8", "replace"), f"invalid UTF-8 replaced (charset {label!r})"
    for codec in chain:
        try:
            text = data.decode(codec) if codec != _CP5022X else _decode_cp5022x(data)
        except (UnicodeError, LookupError):
            continue
        if codec in _SURROGATE_PRONE or _codec(codec) in _SURROGATE_PRONE:
            text = _SURROGATES.sub("\ufffd", text)
        return text, None
    try:
        text = data.decode(chain[0], "replace")
    except (UnicodeError, LookupError):
        return data.decode("utf-8", "replace"), f"charset {label!r} failed: decoded as UTF-8"
    return _SURROGATES.sub("\ufffd", text), f"invalid {label!r} data replaced"


def _from_8bit(value: str, defects: _Defects | None, where: str) -> str:
    """Header text from the byte parser (8-bit bytes arrive as surrogate escapes) to Unicode."""
    if value.isascii():
        return value
    data = value.encode("utf-8", "surrogateescape")
    text, how = _decode_guess(data)
    if how != "UTF-8" and defects is not None:
        defects.add(f"8-bit {where} is not UTF-8: decoded as {how}")
    return text


_ESC_RUN = re.compile(rb"\x1b(\$[@B]|\$\(D|\([BJI])")


def _decode_cp5022x(data: bytes) -> str:
    """ISO-2022-JP with the Microsoft extensions: each JIS X 0208 pair is moved to its
    Shift_JIS code and the whole decoded as cp932 (a superset with NEC and IBM rows).
    Raises UnicodeDecodeError for what is not ISO-2022-JP (e.g. JIS X 0212 runs)."""
    out = bytearray()
    mode = b"(B"
    pos = 0
    for m in [*_ESC_RUN.finditer(data), None]:
        end = m.start() if m is not None else len(data)
        run = data[pos:end]
        if mode in (b"$@", b"$B"):
            stripped = run.replace(b"\r", b"").replace(b"\n", b"")
            if len(stripped) % 2 or any(not 0x21 <= b <= 0x7E for b in stripped):
                raise UnicodeDecodeError("iso2022_jp", data, pos, end, "bad JIS X 0208 run")
            for i in range(0, len(stripped), 2):
                j1, j2 = stripped[i], stripped[i + 1]
                s1 = ((j1 - 0x21) >> 1) + 0x81
                if s1 > 0x9F:
                    s1 += 0x40
                if j1 % 2:
                    s2 = j2 + 0x1F + (1 if j2 >= 0x60 else 0)
                else:
                    s2 = j2 + 0x7E
                out += bytes((s1, s2))
        elif mode == b"(I":
            if any(not 0x21 <= b <= 0x5F for b in run):
                raise UnicodeDecodeError("iso2022_jp", data, pos, end, "bad katakana run")
            out += bytes(b + 0x80 for b in run)
        elif mode == b"$(D":
            raise UnicodeDecodeError("iso2022_jp", data, pos, end, "JIS X 0212 is not in cp932")
        else:
            if not run.isascii():
                raise UnicodeDecodeError("iso2022_jp", data, pos, end, "8-bit byte")
            out += run
        if m is None:
            break
        mode, pos = m.group(1), m.end()
    return out.decode("cp932")
