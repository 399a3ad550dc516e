"""HTML to readable text for the ticket body, through kept libraries: lxml parses, inscriptis
lays the text out (blocks on their own lines, lists with bullets, table rows, `<pre>` as is,
scripts, styles, the head and comments dropped, entities decoded).

What is ours is only the configuration and the links: a link whose address says more than its
text is kept as "text (url)" (inscriptis' own `[text](url)` would repeat addresses that are their
own label, and show `#anchors` and `cid:` images). HTML above `MAX_HTML_PARSE` characters is not
laid out: its text is taken from lxml's tree without scripts and styles, so a hostile part costs
linear time. Measured against html2text (Markdown, GPL-3.0, escapes `*`/`#` and turns tables into
pipes) on the samples and the peer corpus, see tests/test_mail.py and bench/parse_time.py.
"""

from __future__ import annotations

import html as html_module
import re

import lxml.etree
import lxml.html
from inscriptis import Inscriptis
from inscriptis.css_profiles import CSS_PROFILES
from inscriptis.html_properties import Display
from inscriptis.model.config import ParserConfig
from inscriptis.model.html_element import HtmlElement

from gateway import mail as limits

_XML_DECLARATION = re.compile(r"^\s*<\?xml[^>]*\?>")  # lxml refuses str input that declares one
_BLANK_RUNS = re.compile(r"\n[ \t]*(?:\n[ \t]*)+\n")
_TAG = re.compile(r"<[^>]*>")
_SKIP_BLOCK = re.compile(r"<(script|style|head|title)\b.*?</\1\s*>", re.S | re.I)
_INLINE = frozenset(
    "a abbr b bdi bdo big cite code del dfn em font i img ins kbd mark q s samp small span"
    " strike strong sub sup time tt u var wbr".split()
)
_HIDDEN = ("script", "style", "head", "title", "template", "noscript")


def _css() -> dict[str, HtmlElement]:
    """inscriptis' "strict" profile (a browser's defaults), quotes set off by a blank line and
    indented as mail readers show them, templates and noscript fallbacks hidden."""
    css = CSS_PROFILES["strict"].copy()
    css["blockquote"] = HtmlElement(
        display=Display.block, margin_before=1, margin_after=1, padding_inline=2
    )
    for tag in ("template", "noscript"):
        css[tag] = HtmlElement(display=Display.none)
    return css


_CONFIG = ParserConfig(css=_css(), display_links=False, display_images=False)


def _tree(html: str) -> lxml.html.HtmlElement | None:
    """lxml's tree of the document; None when it has no element, or when it is nested deeper
    than libxml2 builds (2,048 levels with huge_tree; 255 without, which drops real mail) and
    the rest of it would be lost."""
    html = _XML_DECLARATION.sub("", html, count=1)
    if not html.strip():
        return None
    parser = lxml.html.HTMLParser(huge_tree=True)  # per call: a parser is not thread-safe
    try:
        tree = lxml.html.document_fromstring(html, parser=parser)
    except (lxml.etree.ParserError, ValueError):  # nothing but comments, or no element at all
        return None
    if parser.error_log.filter_types([lxml.etree.ErrorTypes.ERR_RESOURCE_LIMIT]):
        return None
    return tree


def _stripped(html: str) -> str:
    """The last resort for a document lxml cannot take whole: tags out, entities decoded."""
    text = html_module.unescape(_TAG.sub(" ", _SKIP_BLOCK.sub(" ", html)))
    lines = (" ".join(line.split()) for line in text.splitlines())
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


def _show_url(href: str, label: str) -> bool:
    if not href or not label.strip():
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


def _keep_links(tree: lxml.html.HtmlElement) -> None:
    """Write "(url)" after each link whose address its text does not already show."""
    for a in tree.iter("a"):
        href = (a.get("href") or "").strip()
        if _show_url(href, a.text_content()):
            a.tail = f" ({href})" + (a.tail or "")


def _plain_text(tree: lxml.html.HtmlElement) -> str:
    """The text of an oversized or too deep document: no layout, its words in order, a line
    break at each element that is not inline text."""
    lxml.etree.strip_elements(tree, *_HIDDEN, lxml.etree.Comment, with_tail=False)
    for el in tree.iter():
        if isinstance(el.tag, str) and el.tag not in _INLINE:
            el.text = "\n" + (el.text or "")
            el.tail = "\n" + (el.tail or "")
    lines = (" ".join(line.split()) for line in tree.text_content().splitlines())
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip()


def html_to_text(html: str) -> str:
    """Readable text from HTML: links as "text (url)", no scripts/styles, blocks on new lines."""
    if not html:
        return ""
    tree = _tree(html)
    if tree is None:
        return _stripped(html)
    if len(html) > limits.MAX_HTML_PARSE:
        return _plain_text(tree)
    _keep_links(tree)
    try:
        text = Inscriptis(tree, _CONFIG).get_text()
    except RecursionError:  # inscriptis walks the tree recursively (~900 levels)
        return _plain_text(tree)
    lines = [line.rstrip() for line in text.splitlines()]
    return _BLANK_RUNS.sub("\n\n", "\n".join(lines)).strip("\n")
