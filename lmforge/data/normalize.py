"""Text normalization for `data clean`: HTML, URLs, invisible characters, whitespace, full-width forms, case.

Owns `NormalizeOptions` (each option documented once, here) and `normalize_text` / `normalize_record`. Markdown code
(``` / ~~~ fenced blocks and `inline` spans) is left as written by every option except control_chars, so code
indentation, `<div>` examples and URLs in code survive. Must not drop records (filters.py decides that).
All patterns are compiled once at import; each option is one regex pass or one str.translate.
"""

from __future__ import annotations

import html
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict


class NormalizeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    html: bool = True
    """Strip HTML tags (known HTML element names only, so `List<String>` and `a < b` survive; <script>/<style>
    with their content; block tags such as <p>, <br>, <li> become line breaks) and unescape entities written with a
    semicolon (&amp; &lt; &#39; &#x4e2d;), so `?a=1&copy=2` in a URL is not touched."""
    urls: Literal["keep", "remove"] = "keep"
    """"remove" deletes http(s):// and www. URLs; a Markdown link [text](url) keeps its text. Trailing sentence
    punctuation and CJK text right after a URL are not part of it."""
    control_chars: bool = True
    """Remove control characters (C0/C1 except tab and newline; \\r is turned into \\n) and invisible format
    characters: zero-width space/non-joiner/joiner U+200B-U+200D, word joiner U+2060-U+2064, BOM U+FEFF, soft hyphen
    U+00AD, Mongolian vowel separator U+180E. Removing U+200D splits emoji ZWJ sequences into their parts."""
    whitespace: bool = True
    """Collapse runs of spaces/tabs (and no-break or other Unicode spaces, not the ideographic space U+3000) inside
    a line to one space, drop trailing spaces, keep leading indentation, keep at most 2 consecutive newlines (one
    blank line), trim the text."""
    fullwidth_to_halfwidth: bool = False
    """Turn full-width ASCII forms (U+FF01-U+FF5E: Ａ-Ｚ, ａ-ｚ, ０-９, ＃＄％＆＋－／＜＝＞＠…) into ASCII, but keep
    the full-width punctuation Chinese text is written with (，！？：；（）) and the ideographic space U+3000.
    Half-width katakana and other NFKC compatibility forms are not touched."""
    lowercase_latin: bool = False
    """Lower-case Latin letters only (ASCII, Latin-1, Latin Extended A/B and Additional, e.g. À → à, Ấ → ấ);
    Greek, Cyrillic and everything else keep their case."""


DEFAULT_OPTIONS = NormalizeOptions()

# HTML element names (WHATWG list plus a few obsolete ones still common in scraped pages).
_HTML_TAGS = (
    "a abbr acronym address area article aside audio b base bdi bdo big blockquote body br button canvas caption "
    "center cite code col colgroup data datalist dd del details dfn dialog div dl dt em embed fieldset figcaption "
    "figure font footer form frame frameset h1 h2 h3 h4 h5 h6 head header hgroup hr html i iframe img input ins kbd "
    "label legend li link main map mark menu meta meter nav noscript object ol optgroup option output p param "
    "picture pre progress q rp rt ruby s samp script section select small source span strike strong style sub "
    "summary sup svg table tbody td template textarea tfoot th thead time title tr track tt u ul var video wbr"
).split()
_BLOCK_TAGS = ("address article aside blockquote br dd div dl dt footer form h1 h2 h3 h4 h5 h6 header hr li main nav "
               "ol p pre section table tbody td tfoot th thead tr ul").split()
_TAG_ATTRS = r"""(?:\s(?:[^<>"']|"[^"]*"|'[^']*')*)?/?>"""
_HTML_DROP = re.compile(r"<!--[\s\S]*?-->|<(script|style)\b[^>]*>[\s\S]*?</\1\s*>", re.IGNORECASE)
_HTML_BLOCK = re.compile(rf"[ \t]*</?(?:{'|'.join(_BLOCK_TAGS)}){_TAG_ATTRS}[ \t]*", re.IGNORECASE)
_HTML_TAG = re.compile(rf"</?(?:{'|'.join(sorted(_HTML_TAGS, key=len, reverse=True))}){_TAG_ATTRS}", re.IGNORECASE)
_ENTITY = re.compile(r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});")

_URL_CHARS = r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]"
_URL = rf"(?:https?://|www\.){_URL_CHARS}*[A-Za-z0-9\-_~/#=&%+]"
_MARKDOWN_LINK = re.compile(rf"\[([^\]\n]*)\]\(\s*{_URL}\s*\)")
_URL_RE = re.compile(_URL, re.IGNORECASE)

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u180e\u200b-\u200d\u2060-\u2064\ufeff]")
_CRLF = re.compile(r"\r\n?")

_ODD_SPACES = "\t\u00a0\u1680\u2000-\u200a\u202f\u205f"
_SPACE = f"[ {_ODD_SPACES}]"
_ODD_SPACE = re.compile(f"[{_ODD_SPACES}]")
_TRAILING_SPACE = re.compile(rf"{_SPACE}+(?=\n|\Z)")
_INNER_SPACE = re.compile(rf"(?<=\S){_SPACE}+(?=\S)")
_NEWLINES = re.compile(r"\n{3,}")
_TRIM = " \t\n\u00a0"

_KEEP_FULLWIDTH = "，！？：；（）"
_FULLWIDTH = re.compile(f"[{''.join(chr(c) for c in range(0xFF01, 0xFF5F) if chr(c) not in _KEEP_FULLWIDTH)}]+")
_FULLWIDTH_TABLE = {c: c - 0xFEE0 for c in range(0xFF01, 0xFF5F) if chr(c) not in _KEEP_FULLWIDTH}

# str.lower() on these runs changes only Latin letters (Greek and Cyrillic start at U+0370).
_LATIN_RUN = re.compile("[\x00-\u024f\u1e00-\u1eff]+")

# Markdown code is swapped for private-use placeholders while prose is normalized, then put back.
_CODE = re.compile(r"```[\s\S]*?(?:```|\Z)|~~~[\s\S]*?(?:~~~|\Z)|`[^`\n]+`")
_PLACEHOLDER = re.compile("\ue000([0-9]+)\ue001")


def normalize_text(text: str, options: NormalizeOptions = DEFAULT_OPTIONS) -> str:
    """`text` with every enabled option applied, in this order: control chars, HTML, full-width, URLs,
    lower-case, whitespace."""
    if options.control_chars:
        text = _CONTROL.sub("", text)
        if "\r" in text:
            text = _CRLF.sub("\n", text)
    code: list[str] = []
    if ("`" in text or "~~~" in text) and "\ue000" not in text:
        text = _CODE.sub(lambda m: code.append(m.group()) or f"\ue000{len(code) - 1}\ue001", text)
    if options.html:
        text = _strip_html(text, options.control_chars)
    if options.fullwidth_to_halfwidth and not text.isascii():
        text = _FULLWIDTH.sub(lambda m: m.group().translate(_FULLWIDTH_TABLE), text)
    if options.urls == "remove" and ("://" in text or "www." in text or "WWW." in text):
        text = _URL_RE.sub("", _MARKDOWN_LINK.sub(r"\1", text))
    if options.lowercase_latin:
        text = text.lower() if text.isascii() else _LATIN_RUN.sub(lambda m: m.group().lower(), text)
    if options.whitespace:
        text = _collapse_whitespace(text)
    if code:
        text = _PLACEHOLDER.sub(lambda m: code[int(m.group(1))], text)
    return text


def normalize_record(record: dict, options: NormalizeOptions = DEFAULT_OPTIONS) -> dict:
    """A copy of `record` whose message contents are normalized; other columns are kept as they are."""
    messages = [{**m, "content": normalize_text(m["content"], options)} for m in record["messages"]]
    return {**record, "messages": messages}


def _strip_html(text: str, drop_control: bool) -> str:
    if "<" in text:
        text = _HTML_DROP.sub("", text)
        text = _HTML_BLOCK.sub("\n", text)
        text = _HTML_TAG.sub("", text)
    if "&" in text:
        if drop_control:  # &#8203; must not bring back the zero-width space the control step removed
            text = _ENTITY.sub(lambda m: _CONTROL.sub("", html.unescape(m.group())), text)
        else:
            text = _ENTITY.sub(lambda m: html.unescape(m.group()), text)
    return text


def _collapse_whitespace(text: str) -> str:
    if "\r" in text:
        text = _CRLF.sub("\n", text)
    odd = not text.isascii() and _ODD_SPACE.search(text) or "\t" in text  # fast path: most text has none of these
    if odd or " \n" in text:
        text = _TRAILING_SPACE.sub("", text)
    if odd or "  " in text:
        text = _INNER_SPACE.sub(" ", text)
    if "\n\n\n" in text:
        text = _NEWLINES.sub("\n\n", text)
    return text.strip(_TRIM)
