"""Reply text: the customer's new text, split from the quoted history and the signature below it.

A reply carries the whole conversation quoted under a few new lines. Agents want the new text;
the rest is kept (the backends fold it below a marker, leave it out, attach it or keep it as it
was: `[backends.NAME] quoted`). `split_text` finds where the new text ends in the plain text the
parser produced; `split_html` does the same for an HTML-only body before it becomes text.

What starts the quoted part (the first of these, at the start of a line):
    * an attribution line: "On <date>, <name> wrote:" and its translations (German "Am ...
      schrieb ...:", French "Le ... a écrit :", Dutch "Op ... schreef ...:", Swedish/Danish/
      Norwegian "Den ... skrev ...:", Finnish "... kirjoitti:", Spanish, Italian, Portuguese,
      Polish), also when the client wrapped it over two lines, followed by `>` lines;
    * a run of `>` quoted lines (Gmail, Apple Mail, Thunderbird, mutt plain text);
    * Outlook's separators ("-----Original Message-----" and its translations, the line of
      underscores OWA and new Outlook write) and Outlook's header block without a separator:
      "From:/Von:/De :/Van:/Från:/Fra:/Lähettäjä:" followed within four lines by
      "Sent:/Gesendet:/Envoyé :/Verzonden:/Skickat:/Sendt:/Lähetetty:/Date:/Datum:";
    * forwarded-message markers (Gmail's, Thunderbird's, Apple Mail's "Begin forwarded
      message:", and the parser's own block for an attached message/rfc822).
What starts the signature (in the new text): the "-- " separator line, and the lines mobile
clients add ("Sent from my iPhone", "Von meinem iPhone gesendet", "Envoyé de mon iPhone",
"Get Outlook for iOS"... in the languages above).

Interleaved replies (answers written between quoted lines) are not split: what follows the first
quote is not only quotes, so nothing can be folded without hiding new text.

HTML: quotequail (a kept library) finds the quote of Gmail (`gmail_quote`), Apple Mail
(`blockquote type="cite"`), Thunderbird (`moz-cite-prefix`) and Outlook (its reply header
`divRplyFwdMsg` and the bordered block) in the HTML tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import quotequail

MAX_LINES = 20_000  # lines of a body examined; a longer body is not split
MAX_HTML = 1024 * 1024  # characters of HTML given to quotequail; larger HTML is not split

_ATTRIBUTION = re.compile(
    r"""^\s*(?:
        (?:On|Am|Le|Op|Den|El|Il|Em|W\ dniu|Dne|Il\ giorno)\b.{0,300}?
        (?:wrote|schrieb|a\ écrit|schreef|skrev|escribió|ha\ scritto|scrisse|escreveu|napisał|
           kirjoitti|kirjutas|napsal|írta)(?:\s.{0,250})?:
      | .{1,200}?\b(?:wrote|schrieb|kirjoitti|skrev|schreef)(?:\s.{0,250})?:
    )\s*$""",
    re.X | re.I,
)
_SEPARATOR = re.compile(
    r"""^\s*(?:
        -{2,}\s*(?:Original\ Message|Ursprüngliche\ Nachricht|Message\ d'origine|
            Oorspronkelijk\ bericht|Ursprungligt\ meddelande|Opprinnelig\ melding|
            Oprindelig\ meddelelse|Alkuperäinen\ viesti|Mensaje\ original|
            Messaggio\ originale|Mensagem\ original|Forwarded\ message|Weitergeleitete\ Nachricht|
            Message\ transféré|Doorgestuurd\ bericht|Vidarebefordrat\ meddelande|
            Videresendt\ melding|Videresendt\ meddelelse|Välitetty\ viesti|Original-Nachricht|
            Forwarded\ Message)\s*-{2,}
      | Begin\ forwarded\ message:|Anfang\ der\ weitergeleiteten\ Nachricht:|
        Début\ du\ message\ réexpédié\ :|Début\ du\ message\ transféré\ :
      | _{20,}
    )\s*$""",
    re.X | re.I,
)
_FROM_FIELD = re.compile(
    r"^\s*\*?(?:From|Von|De|Van|Från|Fra|Lähettäjä|Afzender|Da|Od)\s*\*?\s*:\s*\S", re.I
)
_SENT_FIELD = re.compile(
    r"^\s*\*?(?:Sent|Gesendet|Envoyé|Verzonden|Skickat|Sendt|Lähetetty|Date|Datum|Enviado|"
    r"Inviato|Data|Päivämäärä|Verstuurd|To|An|À|Aan|Till|Til|Vastaanottaja|Para|A)\s*\*?\s*:",
    re.I,
)
_SIG_SEPARATOR = re.compile(r"^-- ?$")
_MOBILE = re.compile(
    r"""^\s*(?:
        Sent\ from\ (?:my\ |Mail\ for\ |Outlook|Yahoo\ Mail|Samsung|Proton).{0,60}
      | Get\ Outlook\ for\ .{1,40}
      | Von\ meinem\ .{1,60}\ gesendet\.?
      | Gesendet\ (?:von|mit)\ .{1,60}
      | Envoyé\ (?:de|depuis)\ (?:mon|ma)\ .{1,60}
      | Verzonden\ (?:met|vanaf|van)\ (?:mijn\ )?.{1,60}
      | Skickat\ från\ .{1,60}
      | Sendt\ fra\ .{1,60}
      | Lähetetty\ .{1,60}
      | Enviado\ desde\ .{1,60}
      | Inviato\ da\ .{1,60}
    )\s*$""",
    re.X | re.I,
)
_QUOTED_LINE = re.compile(r"^\s*>")


@dataclass(frozen=True)
class Split:
    """`new`: the new text; `signature`: the signature block ("" when none); `quoted`: the
    quoted history from its first line ("" when none). new + signature + quoted lose nothing
    but surrounding blank lines."""

    new: str
    signature: str
    quoted: str

    @property
    def found(self) -> bool:
        return bool(self.signature or self.quoted)


def split_text(text: str) -> Split:
    """Split plain text into new text, signature and quoted history (see the module docstring)."""
    lines = text.split("\n")
    if len(lines) > MAX_LINES:
        return Split(text, "", "")
    q = _quote_start(lines)
    if q is not None and _interleaved(lines, q):
        q = None
    head = lines if q is None else lines[:q]
    quoted = "" if q is None else "\n".join(lines[q:]).strip("\n")
    s = _signature_start(head)
    new_lines = head if s is None else head[:s]
    signature = "" if s is None else "\n".join(head[s:]).strip("\n")
    return Split("\n".join(new_lines).strip("\n"), signature, quoted)


def split_html(html: str) -> tuple[str, str] | None:
    """(new HTML, quoted HTML) when quotequail finds a quote in `html`, else None."""
    if not html or len(html) > MAX_HTML:
        return None
    try:
        # quotequail treats everything past `limit` lines (default 1,000) as quoted: a long
        # HTML-only mail would have its end folded (or dropped) as history. No mail has more
        # lines than characters, so this limit is never reached (MAX_HTML bounds the walk).
        parts = quotequail.quote_html(html, limit=len(html) + 1, quote_intro_line=True)
    except Exception:  # lxml on broken markup: not split
        return None
    if len(parts) < 2 or not parts[0][0]:
        return None
    new = "".join(h for shown, h in parts if shown)
    quoted = "".join(h for shown, h in parts if not shown)
    # only a quote that runs to the end (interleaved answers are not split)
    if any(shown for shown, _h in parts[[s for s, _ in parts].index(False) :]):
        return None
    return new, quoted


def _quote_start(lines: list[str]) -> int | None:
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if _SEPARATOR.match(line):
            if line.strip().startswith("_") and not _header_block_at(lines, i + 1, skip_blank=True):
                continue  # a line of underscores that is not Outlook's
            return i
        if _QUOTED_LINE.match(line):
            return _with_attribution(lines, i)
        if _FROM_FIELD.match(line) and _header_block_at(lines, i):
            return i
    return None


def _with_attribution(lines: list[str], i: int) -> int:
    """The first `>` line at i: the quote starts at its attribution line(s) when there is one."""
    j = i - 1
    while j >= 0 and not lines[j].strip():
        j -= 1
    if j < 0:
        return i
    if _ATTRIBUTION.match(lines[j]):
        return j
    if j >= 1 and _ATTRIBUTION.match(lines[j - 1].rstrip() + " " + lines[j].strip()):
        return j - 1
    return i


def _header_block_at(lines: list[str], i: int, *, skip_blank: bool = False) -> bool:
    """Outlook's header block: a From line at i, then a Sent/Date/To line within four lines."""
    if skip_blank:
        while i < len(lines) and not lines[i].strip():
            i += 1
    if i >= len(lines) or not _FROM_FIELD.match(lines[i]):
        return False
    return any(_SENT_FIELD.match(line) for line in lines[i + 1 : i + 5])


def _interleaved(lines: list[str], q: int) -> bool:
    """A `>` quote followed by unquoted text again: an answer written between the quotes."""
    first = next(
        (j for j in range(q, min(q + 4, len(lines))) if _QUOTED_LINE.match(lines[j])), None
    )
    if first is None:
        return False  # Outlook quotes unprefixed: everything below is history
    seen_quote = False
    for line in lines[first:]:
        if _QUOTED_LINE.match(line):
            seen_quote = True
            continue
        if not line.strip() or not seen_quote:
            continue
        if _SIG_SEPARATOR.match(line.rstrip()) or _MOBILE.match(line):
            return False  # a signature under the quote (top-posting clients do that too)
        if _ATTRIBUTION.match(line):
            continue
        return True
    return False


def _signature_start(lines: list[str]) -> int | None:
    for i, line in enumerate(lines):
        if _SIG_SEPARATOR.match(line.rstrip("\r")) and line.startswith("--"):
            return i
    for i, line in enumerate(lines):
        if _MOBILE.match(line):
            rest = [x for x in lines[i + 1 :] if x.strip()]
            if len(rest) <= 6:  # a signature is the last few lines, not the middle of the text
                return i
    return None
