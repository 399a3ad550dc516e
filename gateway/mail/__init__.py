"""Parsing: raw mail bytes in, one frozen `ParsedMail` out. Pure CPU work, no I/O.

This package owns everything between the bytes the intake stored and the decoded values the
rest of the pipeline reads: MIME structure, charsets, RFC 2047 words, addresses, the text body,
attachments (TNEF and files uuencoded inside a text part included) and the list of what had to be repaired (`ParsedMail.defects`).

Which library does what, and why
    * MIME structure: the standard library's feed parser with `policy.compat32`, fed in chunks.
      compat32 never raises on access, keeps raw header values, and is the fastest policy.
      A small subclass bounds the nesting depth (the stdlib recurses once per level and fails
      with RecursionError near 1,000 levels; depth also makes every line cost O(depth)).
      `mailparser.MailParser` itself is not used for the walk: it copies every attachment into
      a base64 string and decodes bodies without the repairs below.
    * Addresses: mail-parser's structural address scanner (`mailparser.utils.get_addresses`).
      It decodes display names in lexical context and never promotes an address-looking
      display name to the mailbox: `"support@example.com" <evil@attacker.test>` gives
      evil@attacker.test. This is where mail-parser is better than the stdlib.
    * RFC 2047 words: our own decoder (the stdlib's `decode_header` garbles raw UTF-8 next to
      encoded words and loses words broken by folding); charsets as below.

Repairs (each recorded in `defects`, except the cp1252 rule, which is how the web decodes too)
    * ISO-8859-1 / US-ASCII labels are decoded as Windows-1252 (a superset for text), unless
      the bytes are plainly UTF-8; 8-bit data without a usable label is UTF-8 when valid, else
      Windows-1252; "UTF-8" that has no valid multi-byte sequence at all is Windows-1252.
    * A known name written with a separator inside ("latin-9", "cp-1251") is that charset.
    * Unknown charset labels ("x-unknown-8bit", a typo) count as no label: UTF-8 when valid,
      else the site's `fallback_charsets`, a detector, Windows-1252 (as undeclared 8-bit data).
      A known codec whose data is invalid: replacement characters. Known-weak labels get
      their superset (ISO-2022-JP → its extensions, Shift_JIS → cp932, GB2312 → GB18030,
      Big5 → Big5-HKSCS, KS C 5601 / EUC-KR → cp949, TIS-620 → cp874); invalid data is
      decoded with replacement characters, never raised.
    * Raw 8-bit headers (RFC 6532): UTF-8 when valid, else Windows-1252.
    * Encoded words split by header folding are rejoined; adjacent words of one charset are
      decoded together (a character split across two words survives).
    * A multipart without a usable boundary: the boundary is guessed from the body (a `--token`
      line seen at least twice); failing that, the body is kept as text. An unclosed boundary
      keeps every part up to the end.
    * Nesting deeper than `MAX_DEPTH`: the inner structure is kept undecoded as an attachment.
    * No header section at all: the whole input is the body (the stdlib's own test corpus has
      such a message). Only empty input, or input without headers that is not text either
      (NUL bytes or mostly control bytes), raises `ParseError`.

Sender identity
    * `from_addr` is the first address of From, else of Reply-To, else of Sender ("" when none:
      the envelope is not known here, the worker may fall back to it); addresses lower-case,
      display names decoded. A display name that looks like another address stays a name
      (and adds a defect); it never becomes `from_addr`.

Body and attachments (what a helpdesk agent wants to read)
    * `text` is the text/plain body; where a body part has only HTML, the HTML converted to
      text by inscriptis over lxml's tree (links kept as "text (url)", scripts, styles and
      hidden preview text dropped, block elements on their own lines, entities decoded). Several inline text parts (e.g. text, image, text) are
      joined in order. format=flowed is unwrapped.
    * A forwarded message (message/rfc822 or message/global) is shown in the body as a
      "Forwarded message" block (its From/Date/Subject/To and its text), and kept whole as an
      `.eml` attachment (headers and its own attachments intact). Its own attachments are not
      extracted a second time (no duplicate bytes against the backends' size limits); the block
      names them. Inside multipart/report, the returned message is only an attachment.
    * multipart/report: `report_type` is set (delivery-status, disposition-notification...);
      the human-readable first part is the body, the machine parts are attachments.
    * TNEF (winmail.dat): the files inside become attachments (its text is the body only when
      the mail has no other); winmail.dat itself is kept only when extraction fails: it cannot
      be decoded, is truncated, or yields neither files nor text.
    * Parts with a Content-ID referenced as `cid:` from the HTML are `inline=True`; every other
      part, a Content-ID notwithstanding, is a real attachment. Zero-byte files are kept.
    * File names: RFC 2231 (charset, continuations) and RFC 2047 forms are decoded; paths and
      control characters are removed; nameless parts get `attachment-N.<ext>`.

Limits (so that hostile input costs linear time)
    * `headers` keeps every header in order, each value capped at `MAX_HEADER_VALUE` characters
      (marked "[truncated]"), all together at `MAX_HEADERS_TOTAL`; past that budget only the
      headers classification needs (`_ESSENTIAL_HEADERS`) are kept, each capped at 1 KiB.
      Structured fields (addresses, ids) are read from the full values, each address field
      (all its occurrences together) up to `MAX_ADDRESS_HEADER` characters (~7,000 addresses).
    * Content-Type and Content-Disposition values are cut at 8 KiB (the stdlib's parameter
      parser is quadratic); HTML above `MAX_HTML_PARSE` is not laid out, only its words are
      taken from lxml's tree (inscriptis is the slower step).
    * `references` keeps the first id (the thread root) and the last `MAX_REFERENCES - 1`.
    * At most `MAX_PARTS` MIME parts are examined; at most `MAX_DEFECTS` defects are listed.
    * A flood of parts costs the stdlib ~15 µs and ~300 bytes each: past `MAX_BOUNDARY_LINES`
      lines that look like boundaries ("--" and a non-blank), the rest of the message is not
      parsed but kept as the attachment `unparsed-remainder.txt`.

Layers (each module imports only those above it)
    defects   the capped list of repair notes
    charset   bytes + declared charset -> text (`decode_bytes`), 8-bit header text
    headers   RFC 2047 words, unfolding, message ids, the header index, addresses
    mime      bytes -> the stdlib's Message tree (bounded parser, flood cut, start of message)
    html      HTML -> readable text (`html_to_text`: lxml + inscriptis)
    walk      the MIME walk: body segments, attachments, forwards, reports, TNEF
    source    `parse` (whole bytes or a RawSource read in pieces), `extract_message_id`

The limits below are read by the layers at call time (`limits.NAME`), so that one place states
them and a test may shrink them.
"""

from __future__ import annotations

MAX_DEPTH = 32  # MIME nesting levels decoded; deeper structure is kept undecoded
MAX_PARTS = 2000  # MIME parts examined
MAX_HEADER_VALUE = 32 * 1024  # characters kept per header value in `headers`
MAX_HEADERS_TOTAL = 256 * 1024  # characters kept in `headers` altogether
MAX_ADDRESS_HEADER = 256 * 1024  # characters of one address field (all occurrences) parsed
MAX_REFERENCES = 100
MAX_DEFECTS = 40
MAX_HTML_PARSE = 1024 * 1024  # larger HTML gives its words without layout (lxml only)
MAX_BOUNDARY_LINES = 10_000  # "--x" lines parsed as MIME; the rest is kept raw (part floods)
_FEED_CHUNK = 1024 * 1024  # bytes fed to the MIME parser at a time
_SOURCE_HEAD = 1 << 20  # what is read first of a RawSource: the header section lives here
_LINESEP_WINDOW = 4096  # the line ends of the message are judged by its first bytes

# The layers read the limits above from this package, so they are imported after them.
from gateway.mail.charset import decode_bytes  # noqa: E402
from gateway.mail.headers import decode_words  # noqa: E402
from gateway.mail.html import html_to_text  # noqa: E402
from gateway.mail.mime import _fast_base64  # noqa: E402, F401 (tests of the fast path)
from gateway.mail.source import extract_message_id, parse  # noqa: E402

__all__ = [
    "MAX_DEPTH",
    "MAX_HEADERS_TOTAL",
    "MAX_HEADER_VALUE",
    "decode_bytes",
    "decode_words",
    "extract_message_id",
    "html_to_text",
    "parse",
]
