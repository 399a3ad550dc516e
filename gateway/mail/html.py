"""HTML to readable text for the ticket body: links kept as "text (url)", scripts and styles
dropped, block elements on new lines, entities decoded; oversized HTML goes through a tag stripper."""

from __future__ import annotations

import html as html_module
import re
from html.parser import HTMLParser

from gateway import mail as limits

_WS = re.compile(r"\s+")
_MANY_NEWLINES = re.compile(r"\n{3,}")
_TRAILING_SPACE = re.compile(r"[ \t]+\n")
_TAG = re.compile(r"<[^>]*>")
_SKIP_BLOCK = re.compile(r"<(script|style|head|title)\b.*?</\1\s*>", re.S | re.I)


class _HTMLToText(HTMLParser):
    _BLOCK = frozenset(
        {"p", "div", "tr", "table", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4",
         "h5", "h6", "blockquote", "pre", "hr", "section", "article", "header", "footer",
         "address", "center", "form", "fieldset", "figure", "figcaption", "main", "nav",
         "aside", "tbody", "thead", "tfoot", "caption", "body", "details", "summary"}
    )  # fmt: skip
    _PARAGRAPH = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "table", "ul",
                            "ol", "pre", "hr"})  # fmt: skip
    _SKIP = frozenset({"script", "style", "template", "title"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._out: list[str] = []
        self._newlines = 2  # trailing newlines in the output (2 = start of text)
        self._space = True
        self._skip = 0
        self._head = False
        self._pre = 0
        self._links: list[tuple[str, int]] = []

    def _emit(self, text: str) -> None:
        if not text:
            return
        self._out.append(text)
        stripped = text.rstrip("\n")
        if stripped:
            self._newlines = len(text) - len(stripped)
        else:
            self._newlines += len(text)
        self._space = text[-1].isspace()

    def _break(self, count: int) -> None:
        if self._newlines < count:
            self._emit("\n" * (count - self._newlines))

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skip += 1
            return
        if tag == "head":
            self._head = True
            return
        if tag == "body":
            self._head = False
        if self._skip or self._head:
            return
        if tag == "br":
            self._emit("\n")
        elif tag == "li":
            self._break(1)
            self._emit("- ")
            self._space = True
        elif tag in ("td", "th"):
            if not self._space:
                self._emit(" ")
        elif tag in self._BLOCK:
            self._break(2 if tag in self._PARAGRAPH else 1)
            if tag == "pre":
                self._pre += 1
            elif tag == "hr":
                self._emit("----------\n")
        elif tag == "a" and len(self._links) < 32:  # bounded: a label is joined at </a>
            href = next((v for k, v in attrs if k == "href" and v), "")
            self._links.append((href.strip(), len(self._out)))

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP:
            self._skip = max(0, self._skip - 1)
            return
        if tag == "head":
            self._head = False
            return
        if self._skip or self._head:
            return
        if tag == "a" and self._links:
            href, start = self._links.pop()
            label = "".join(self._out[start : start + 64]).strip()
            if _show_url(href, label) and not label.endswith(f"({href})"):
                self._emit(f" ({href})")
        elif tag in self._BLOCK:
            if tag == "pre":
                self._pre = max(0, self._pre - 1)
            self._break(2 if tag in self._PARAGRAPH else 1)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in ("br", "hr", "img"):
            self.handle_endtag(tag)

    def handle_data(self, data: str) -> None:
        if self._skip or self._head or not data:
            return
        if self._pre:
            self._emit(data)
            return
        text = _WS.sub(" ", data)
        if self._space or self._newlines:
            text = text.lstrip(" ")
        self._emit(text)

    def text(self) -> str:
        out = "".join(self._out)
        out = _TRAILING_SPACE.sub("\n", out)
        return _MANY_NEWLINES.sub("\n\n", out).strip()


def _show_url(href: str, label: str) -> bool:
    if not href or not label:
        return False
    low = href.lower()
    if low.startswith(("#", "javascript:", "data:", "cid:", "about:")):
        return False

    def norm(s: str) -> str:
        s = s.strip().lower()
        for prefix in ("mailto:", "https://", "http://", "tel:"):
            if s.startswith(prefix):
                s = s[len(prefix) :]
        return s.rstrip("/")

    return norm(href) != norm(label)


def html_to_text(html: str) -> str:
    """Readable text from HTML: links as "text (url)", no scripts/styles, blocks on new lines."""
    if not html:
        return ""
    if len(html) <= limits.MAX_HTML_PARSE:
        parser = _HTMLToText()
        try:
            parser.feed(html)
            parser.close()
            return parser.text()
        except Exception:  # html.parser has asserted on odd markup before
            pass
    text = _TAG.sub(" ", _SKIP_BLOCK.sub(" ", html))
    text = html_module.unescape(text)
    lines = (" ".join(line.split()) for line in text.splitlines())
    return _MANY_NEWLINES.sub("\n\n", "\n".join(lines)).strip()
