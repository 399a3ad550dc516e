"""The HTML body as it may go to a system that shows HTML (the SuperOffice WebAPI's `HtmlBody`):
sanitised by nh3 (the Ammonia sanitiser, an html5ever parse and an allowlist), never as it came.

What an agent's browser must not do when it opens the ticket: run anything (scripts, event
handlers, `javascript:` links, forms, frames, objects are removed), or fetch anything the sender
chose (remote images, tracking pixels, `srcset`, `background` attributes, stylesheets and
`<link>`, `<base>`, `<meta http-equiv=refresh>`, CSS `url()`: images keep only `cid:` sources,
which point at the mail's own inline parts; style attributes keep only properties that cannot
load anything). Links stay clickable, with `rel="noopener noreferrer"`.
"""

from __future__ import annotations

import nh3

# Layout properties mail clients write inline; none of them takes a URL, so none can load one.
_STYLE_PROPERTIES = frozenset(
    {
        "color", "background-color", "font", "font-family", "font-size", "font-style",
        "font-weight", "text-align", "text-decoration", "text-indent", "text-transform",
        "vertical-align", "white-space", "line-height", "letter-spacing", "width", "height",
        "max-width", "min-width", "margin", "margin-top", "margin-right", "margin-bottom",
        "margin-left", "padding", "padding-top", "padding-right", "padding-bottom",
        "padding-left", "border", "border-top", "border-right", "border-bottom", "border-left",
        "border-color", "border-style", "border-width", "border-collapse", "border-spacing",
        "border-radius", "list-style-type",
    }
)  # fmt: skip
_ATTRIBUTES: dict[str, set[str]] = {
    **{tag: set(attrs) for tag, attrs in nh3.ALLOWED_ATTRIBUTES.items()},
    "*": {"style", "dir", "lang", "title"},
    "td": {*nh3.ALLOWED_ATTRIBUTES.get("td", ()), "width", "valign"},
    "th": {*nh3.ALLOWED_ATTRIBUTES.get("th", ()), "width", "valign"},
    "table": {*nh3.ALLOWED_ATTRIBUTES.get("table", ()), "width", "border", "cellpadding",
              "cellspacing"},
    "font": {"color", "face", "size"},
}  # fmt: skip
_TAGS = {*nh3.ALLOWED_TAGS, "font"}
# removed with their content (the rest of the markup not allowed keeps its text)
_DROP_WITH_CONTENT = {"script", "style", "head", "title", "template", "noscript", "iframe",
                      "object", "embed", "select", "textarea"}  # fmt: skip


def _attribute(tag: str, name: str, value: str) -> str | None:
    if tag == "img" and name == "src":  # only the mail's own inline parts: nothing remote
        return value if value.strip().lower().startswith("cid:") else None
    return value


def safe_html(html: str) -> str:
    """The HTML with nothing that runs and nothing that loads from elsewhere (see above)."""
    if not html.strip():
        return ""
    return nh3.clean(
        html,
        tags=_TAGS - _DROP_WITH_CONTENT,
        clean_content_tags=_DROP_WITH_CONTENT,
        attributes=_ATTRIBUTES,
        attribute_filter=_attribute,
        url_schemes={*nh3.ALLOWED_URL_SCHEMES, "cid"},
        filter_style_properties=set(_STYLE_PROPERTIES),
        strip_comments=True,
        link_rel="noopener noreferrer",
    )
