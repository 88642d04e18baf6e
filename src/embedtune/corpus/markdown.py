"""Markdown to retrieval text, the way a Markdown parser reads it (markdown-it-py, CommonMark + tables).

What a reader sees is kept: headings (each its own paragraph, and the document's title and section path),
paragraphs, list items (one line each), table rows (cells joined by `` | ``), block quotes, the text of HTML
blocks, and code blocks with their code verbatim (a ``#`` line in a fence is a comment, not a heading).
What a reader never sees is dropped: HTML comments and tags, link reference definitions, link targets,
emphasis markers, YAML front matter, and templating directives that a site generator replaces before
rendering: mdBook's ``{{#include ...}}`` / ``{{#rustdoc_include ...}}`` / ``{{#playground ...}}``, Jinja and
Liquid statements ``{% ... %}`` and comments ``{# ... #}``. A Jinja expression ``{{ x }}`` is left alone: in
code it is as likely to be Rust's or Python's escaped braces.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from markdown_it import MarkdownIt
from markdown_it.token import Token

from embedtune.corpus.clean import normalize

# mdBook directives anywhere; Jinja/Liquid statements and comments outside code.
_MDBOOK = re.compile(r"\{\{#[^{}]*\}\}")
_JINJA = re.compile(r"\{%.*?%\}|\{#.*?#\}", re.DOTALL)
_FRONT_MATTER = re.compile(r"\A(?:\ufeff)?---[ \t]*\n(.*?\n)(?:---|\.\.\.)[ \t]*(?:\n|\Z)", re.DOTALL)
_FRONT_TITLE = re.compile(r"^title:[ \t]*(['\"]?)(.+?)\1[ \t]*$", re.MULTILINE)
_SPACE_BEFORE_PUNCT = re.compile(r" +([.,;:!?)])")  # get_text(" ") puts a space after every tag
SECTION_SEP = " > "


@dataclass
class MarkdownText:
    """The cleaned text, its title, and where each section starts in the text (offset, heading path)."""

    title: str
    text: str
    sections: list[tuple[int, str]] = field(default_factory=list)


def _parser() -> MarkdownIt:
    return MarkdownIt("commonmark", {"html": True}).enable("table")


def markdown_to_text(source: str) -> MarkdownText:
    """Parse ``source`` as Markdown and return what a reader of the rendered page reads (module docstring).

    Each block is normalised on its own (see :func:`embedtune.corpus.clean.normalize`) and blocks are joined
    by a blank line, so normalising the whole text again changes nothing and the section offsets hold."""
    front_title, body = _front_matter(source)
    walker = _Walker()
    walker.walk(_parser().parse(body))
    title = front_title or walker.first_h1 or walker.first_heading
    return MarkdownText(normalize(title), walker.text(), walker.sections)


def _front_matter(source: str) -> tuple[str, str]:
    """(title from YAML front matter, the body without it); Jekyll/Hugo pages start with one."""
    match = _FRONT_MATTER.match(source)
    if not match:
        return "", source
    title = _FRONT_TITLE.search(match.group(1))
    return (title.group(2).strip() if title else ""), source[match.end():]


class _Walker:
    """One pass over markdown-it's block tokens, collecting normalised blocks and the heading path."""

    def __init__(self) -> None:
        self.blocks: list[str] = []
        self.sections: list[tuple[int, str]] = []
        self.first_h1 = ""
        self.first_heading = ""
        self._length = 0  # length of the text joined so far
        self._path: list[tuple[int, str]] = []  # (level, heading) of the open sections
        self._lines: list[str] | None = None  # lines of the list or table being collected
        self._depth = 0  # nesting of lists and tables
        self._row: list[str] | None = None
        self._heading: int | None = None

    def walk(self, tokens: list[Token]) -> None:
        for tok in tokens:
            self._token(tok)

    def text(self) -> str:
        return "\n\n".join(self.blocks)

    def _token(self, tok: Token) -> None:
        kind = tok.type
        if kind in ("bullet_list_open", "ordered_list_open", "table_open"):
            self._open_group()
        elif kind in ("bullet_list_close", "ordered_list_close", "table_close"):
            self._close_group()
        elif kind == "tr_open":
            self._row = []
        elif kind == "tr_close" and self._row is not None:
            self._line(" | ".join(c for c in self._row if c))
            self._row = None
        elif kind == "heading_open":
            self._heading = int(tok.tag[1:])
        elif kind == "heading_close":
            self._heading = None
        elif kind == "inline":
            self._inline(tok)
        elif kind in ("fence", "code_block"):
            self._block(_code(tok.content))
        elif kind == "html_block":
            self._block(_html_text(tok.content))

    def _inline(self, tok: Token) -> None:
        text = _strip_directives(_inline_text(tok.children or []))
        if self._heading is not None:
            self._enter_section(self._heading, normalize(text))
        elif self._row is not None:
            self._row.append(normalize(text))
        else:
            self._line(text)

    def _enter_section(self, level: int, heading: str) -> None:
        if not heading:
            return
        self.first_heading = self.first_heading or heading
        if level == 1 and not self.first_h1:
            self.first_h1 = heading
        while self._path and self._path[-1][0] >= level:
            self._path.pop()
        self._path.append((level, heading))
        if self._add(heading) is not None:
            self.sections.append((self._length - len(heading), SECTION_SEP.join(h for _, h in self._path)))

    def _open_group(self) -> None:
        if self._depth == 0:
            self._lines = []
        self._depth += 1

    def _close_group(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._lines is not None:
            lines, self._lines = self._lines, None
            self._block("\n".join(lines))

    def _line(self, text: str) -> None:
        """A paragraph, or one line of the list or table being collected."""
        text = normalize(text)
        if self._lines is not None:
            if text:
                self._lines.append(text)
        else:
            self._block(text)

    def _block(self, text: str) -> None:
        if self._lines is not None:  # a code block or HTML inside a list item stays in the list
            self._lines.extend(line for line in normalize(text).split("\n") if line)
            return
        self._add(text)

    def _add(self, block: str) -> int | None:
        block = normalize(block)
        if not block:
            return None
        self._length += (2 if self.blocks else 0) + len(block)
        self.blocks.append(block)
        return self._length


def _inline_text(children: list[Token]) -> str:
    parts: list[str] = []
    for child in children:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type == "softbreak":
            parts.append(" ")
        elif child.type == "hardbreak":
            parts.append("\n")
        elif child.type == "image":  # its alt text, which markdown-it keeps as children
            parts.append(_inline_text(child.children or []) or child.content)
        # html_inline (tags, comments), link/emphasis markers: nothing a reader sees
    return "".join(parts)


def _strip_directives(text: str) -> str:
    return _JINJA.sub("", _MDBOOK.sub("", text))


def _code(content: str) -> str:
    """A code block's code; a line that was only an mdBook include (the listing lives in another file) goes."""
    lines = [_MDBOOK.sub("", line) for line in content.split("\n")]
    kept = [line for line, raw in zip(lines, content.split("\n"), strict=True) if line.strip() or not raw.strip()]
    return "\n".join(kept).strip("\n")


def _html_text(html: str) -> str:
    """The visible text of an HTML block: scripts and styles dropped; comments are not text to get_text."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(_strip_directives(html), "html.parser")
    for tag in soup(["script", "style", "template"]):
        tag.decompose()
    return _SPACE_BEFORE_PUNCT.sub(r"\1", soup.get_text(" "))
