"""Markup to plain prose: HTML, POD, roff (man pages) and the tagged Brown corpus.

Each converter keeps running prose and drops what a reader skips: code listings (`<pre>`, POD
verbatim paragraphs, roff `.nf`/`.EX` blocks), navigation, scripts and styles. Output is
paragraphs separated by one blank line, whitespace inside a paragraph collapsed to single
spaces. Only the standard library is used (`html.parser`, `re`), so the corpus code adds no
dependency.
"""

from __future__ import annotations

import html
import re
from html.parser import HTMLParser

_WS = re.compile(r"\s+")


def paragraphs(text: str) -> str:
    """Collapse whitespace inside paragraphs; paragraphs (blank-line separated) keep one blank
    line between them; empty ones go."""
    paras = (_WS.sub(" ", p).strip() for p in re.split(r"\n\s*\n", text))
    return "\n\n".join(p for p in paras if p)


def plain_text(text: str) -> str:
    """Plain text kept line by line (verse and plays keep their lines): trailing spaces and
    runs of blank lines go, paragraphs stay separated by one blank line."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


# --- HTML -----------------------------------------------------------------------------------

# Elements whose whole content is dropped. `pre` holds code listings; the rest is page chrome.
_SKIP_TAGS = frozenset({"script", "style", "head", "title", "nav", "noscript", "template", "svg",
                        "button", "form", "header", "footer", "aside", "pre", "select", "math"})
# Class names (whole words) of page chrome in the generators the corpora use: Sphinx
# (headerlink, sphinxsidebar, related), rustdoc (anchor, rightside, srclink, sidebar), mdBook,
# javadoc (summary tables, signatures), Haddock (links, src, instances), DocBook/Publican
# (navheader, navfooter, docnav), cppreference (t-navbar), Texinfo (nav_table), Scribble (tocset).
_SKIP_CLASSES = frozenset({
    "headerlink", "sphinxsidebar", "sphinxsidebarwrapper", "related", "sidebar", "anchor",
    "rightside", "srclink", "navheader", "navfooter", "docnav", "breadcrumb", "breadcrumbs",
    "toc", "footer", "navigation", "nav-bar", "top-nav", "sub-nav", "copy-button", "highlight",
    "code-header", "skip-nav", "search", "summary", "type-signature", "member-signature",
    "inheritance", "links", "src", "instances", "t-navbar", "t-dcl-begin", "editsection",
    "nav_table", "tocset", "tocview", "menu",
})
_SKIP_IDS = frozenset({"package-header", "module-header", "table-of-contents", "synopsis",
                       "footer", "sidebar", "searchbox"})
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                   "param", "source", "track", "wbr"})
_BLOCK = frozenset({"p", "div", "section", "article", "main", "h1", "h2", "h3", "h4", "h5", "h6",
                    "li", "ul", "ol", "dl", "dt", "dd", "table", "tr", "blockquote", "hr",
                    "figure", "figcaption", "caption", "body", "details", "summary"})
_MAIN_RE = re.compile(r"<main[\s>]|\brole\s*=\s*[\"']?main\b", re.I)


class _HTMLText(HTMLParser):
    """Collects text; `main_only` keeps only text inside <main> or role="main" elements."""

    def __init__(self, main_only: bool):
        super().__init__(convert_charrefs=True)
        self.main_only = main_only
        self.out: list[str] = []
        self.skip_tag: str | None = None  # the element being dropped, and its nesting depth
        self.skip_depth = 0
        self.main_tag: str | None = None  # the main element we are inside, and its depth
        self.main_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID:
            if tag in ("br", "hr") and self.skip_tag is None:
                self.out.append("\n\n" if tag == "hr" else "\n")
            return
        if self.skip_tag is not None:
            self.skip_depth += tag == self.skip_tag
            return
        if self.main_tag is not None:
            self.main_depth += tag == self.main_tag
        a = dict(attrs)
        if self.main_only and self.main_tag is None and (tag == "main" or a.get("role") == "main"):
            self.main_tag, self.main_depth = tag, 1
        classes = set((a.get("class") or "").split())
        if (tag in _SKIP_TAGS or classes & _SKIP_CLASSES or a.get("id") in _SKIP_IDS
                or a.get("role") == "navigation"):
            self.skip_tag, self.skip_depth = tag, 1
            return
        if tag in _BLOCK:
            self.out.append("\n\n")
        elif tag in ("td", "th"):
            self.out.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if self.skip_tag is not None:
            if tag == self.skip_tag:
                self.skip_depth -= 1
                if self.skip_depth == 0:
                    self.skip_tag = None
            return
        if tag in _BLOCK:
            self.out.append("\n\n")
        if self.main_tag is not None and tag == self.main_tag:
            self.main_depth -= 1
            if self.main_depth == 0:
                self.main_tag = None

    def handle_data(self, data: str) -> None:
        if self.skip_tag is None and (not self.main_only or self.main_tag is not None):
            self.out.append(data)


def html_to_text(markup: str) -> str:
    """Visible prose of an HTML page: the <main> (or role="main") region when the page has one,
    else the body; without scripts, styles, navigation, code listings or heading anchors."""
    parser = _HTMLText(main_only=bool(_MAIN_RE.search(markup)))
    parser.feed(markup)
    parser.close()
    return paragraphs("".join(parser.out))


# --- POD (Perl documentation) ---------------------------------------------------------------

_POD_ESCAPES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/"}


def _pod_code(letter: str, body: str) -> str:
    if letter in "XZ":
        return ""
    if letter == "E":
        if body in _POD_ESCAPES:
            return _POD_ESCAPES[body]
        base = 16 if body.lower().startswith("0x") else 8 if body.startswith("0") else 10
        try:  # E<number>: decimal, 0x hex or 0 octal, as perlpod says
            return chr(int(body, base))
        except ValueError:
            return html.unescape(f"&{body};")
    if letter == "L":
        if "|" in body:
            return body.split("|", 1)[0]
        name, _, section = body.partition("/")
        section = section.strip('"')
        return f"{section} in {name}" if name and section else (section or name)
    return body  # B, I, C, F, S: the text itself


_POD_DOUBLE = re.compile(r"([A-Z])<{2,}\s+(.*?)\s+>{2,}", re.S)
_POD_SINGLE = re.compile(r"([A-Z])<([^<>]*)>")


def _pod_inline(text: str) -> str:
    text = _POD_DOUBLE.sub(lambda m: _pod_code(m[1], m[2]), text)
    while True:  # innermost first, until no formatting code is left
        new = _POD_SINGLE.sub(lambda m: _pod_code(m[1], m[2]), text)
        if new == text:
            return text
        text = new


def pod_to_text(pod: str) -> str:
    """Prose of a POD document: headings and ordinary paragraphs with formatting codes resolved;
    verbatim (code) paragraphs, `=begin`/`=end` and `=for` blocks dropped."""
    out: list[str] = []
    in_block = False  # inside =begin ... =end
    in_pod = True  # a .pm file's code between =cut and the next command is skipped
    for para in re.split(r"\n[ \t]*\n", pod.replace("\r\n", "\n")):
        if not para.strip():
            continue
        if para.startswith("="):
            command, _, rest = para[1:].partition(" ")
            command = command.split("\n", 1)[0]
            in_pod = command != "cut"
            if command == "begin":
                in_block = True
            elif command == "end":
                in_block = False
            elif not in_block and command.startswith(("head", "item")):
                rest = rest.strip().lstrip("*").strip()
                if rest and not re.fullmatch(r"\d+\.?", rest):
                    out.append(_pod_inline(rest))
            continue
        if in_block or not in_pod or para[0] in " \t":
            continue
        out.append(_pod_inline(para))
    return paragraphs("\n\n".join(out))


# --- roff (man pages) -----------------------------------------------------------------------

_ROFF_SPECIAL = {
    "em": "\u2014", "en": "\u2013", "aq": "'", "dq": '"', "lq": "\u201c", "rq": "\u201d",
    "oq": "\u2018", "cq": "\u2019", "bu": "\u2022", "co": "\u00a9", "rg": "\u00ae", "tm": "\u2122",
    "mu": "\u00d7", "ti": "~", "ha": "^", "pl": "+", "mi": "-", "hy": "-", "dg": "\u2020",
    "R": "\u00ae", "Tm": "\u2122", "ga": "`", "aa": "\u00b4", "sl": "/", "rs": "\\", "at": "@",
    "sh": "#", "Do": "$", "ba": "|", "lB": "[", "rB": "]", "lC": "{", "rC": "}", "ua": "\u2191",
    "da": "\u2193", "->": "\u2192", "<-": "\u2190", "<=": "\u2264", ">=": "\u2265", "==": "\u2261",
    "!=": "\u2260", "de": "\u00b0", "ss": "\u00df", "fi": "fi", "fl": "fl",
}
_ROFF_ESCAPE = re.compile(
    r"\\(?:"
    r"\"(?P<comment>.*)$"  # \" comment to end of line
    r"|[fFgkmMnVYz](?:\((?P<x2>..)|\[(?P<xn>[^\]]*)\]|.)"  # fonts, registers: dropped
    r"|s[+-]?(?:\d\d?|\(\d\d|\[[^\]]*\])"  # size changes: dropped
    r"|\*(?:\((?P<s2>..)|\[(?P<sn>[^\]]*)\]|(?P<s1>.))"  # strings
    r"|\((?P<c2>..)|\[(?P<cn>[^\]]*)\]"  # special characters
    r"|(?P<one>.)"  # one-character escapes
    r")", re.M)
_ROFF_ONE = {"-": "-", "e": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "'": "\u00b4",
             "`": "`", ".": "."}


def _roff_escape(m: re.Match[str]) -> str:
    if m["comment"] is not None:
        return ""
    for special in (m["c2"], m["cn"], m["s2"], m["sn"], m["s1"]):
        if special is not None:
            return _ROFF_SPECIAL.get(special, "")
    if m["one"] is not None:
        return _ROFF_ONE.get(m["one"], "")
    return ""  # fonts, sizes, registers, \& \c \| \^ and the like


def _roff_inline(text: str) -> str:
    return _ROFF_ESCAPE.sub(_roff_escape, text)


_ROFF_ARG = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')
_ROFF_BREAK = frozenset({"PP", "LP", "P", "sp", "TP", "TQ", "IP", "HP", "SH", "SS", "RS", "RE",
                         "br", "bp", "SY", "YS", "Sh", "Ss", "Pp", "Bl", "El", "It", "Bd", "Ed"})
_ROFF_FONTS = frozenset({"B", "I", "SM", "SB", "BR", "BI", "IB", "IR", "RB", "RI", "Nm", "Ar",
                         "Fl", "Cm", "Em", "Sy", "Pa", "Va", "Fn", "Xr", "Dv", "Er", "Ev"})
_ROFF_SKIP_BLOCKS = {"nf": "fi", "EX": "EE", "TS": "TE", "EQ": "EN", "de": "..", "ig": ".."}


def man_to_text(roff: str) -> str:
    """Prose of a man page in roff (man or mdoc macros): section headings and filled text, with
    font changes and escapes resolved; no-fill blocks (.nf, .EX: code), tables and equations
    dropped."""
    out: list[str] = []
    end_of_block: str | None = None
    for line in roff.replace("\r\n", "\n").split("\n"):
        if end_of_block is not None:
            if line.lstrip(".'").split(" ", 1)[0].strip() == end_of_block.lstrip("."):
                end_of_block = None
            continue
        if not line.startswith((".", "'")):
            out.append(_roff_inline(line) if line.strip() else "\n\n")
            continue
        request, _, rest = line[1:].strip().partition(" ")
        if request.startswith(('\\"', '"')) or request == "":
            continue
        if request in _ROFF_SKIP_BLOCKS:
            end_of_block = _ROFF_SKIP_BLOCKS[request]
            continue
        args = [a if a is not None and a != "" else b for a, b in _ROFF_ARG.findall(rest)]
        args = [a.replace('""', '"') for a in args]
        if request in _ROFF_BREAK:
            out.append("\n\n")
            if request in ("SH", "SS", "Sh", "Ss", "IP") and args:
                heading = args[0] if request == "IP" else " ".join(args)
                out.append(_roff_inline(heading) + "\n\n")
        elif request in _ROFF_FONTS:
            joiner = " " if request in ("B", "I", "SM", "SB") or len(request) != 2 \
                or not request.isupper() else ""
            out.append(_roff_inline(joiner.join(args)))
        # any other request (.TH, .ft, .in, .ad, .UR, ...) carries no prose
    return paragraphs("\n".join(out))


# --- Brown corpus (word/tag tokens) ---------------------------------------------------------

_NO_SPACE_BEFORE = re.compile(r" ([,.;:!?)\]}%]|'s\b|'d\b|n't\b|'ll\b|'re\b|'ve\b|'m\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def brown_to_text(tagged: str) -> str:
    """Untagged text of a Brown corpus file: tokens `word/tag` lose their tags, the quote tokens
    `` and '' become ", and the sentences of the file join into one paragraph."""
    words = [tok.rsplit("/", 1)[0] for tok in tagged.split() if "/" in tok]
    text = " ".join(words).replace("``", '"').replace("''", '"')
    text = re.sub(r'" (.*?) "', r'"\1"', text)  # pair up the quotes, tight to their words
    text = _NO_SPACE_AFTER.sub(r"\1", _NO_SPACE_BEFORE.sub(r"\1", text))
    return paragraphs(text)
