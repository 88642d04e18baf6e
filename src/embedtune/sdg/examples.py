"""A user's example queries: the few-shot setting of Promptagator (Dai et al., 2022).

A handful of real queries, each with the passage it asks about, fix the *style* of every synthetic query:
SciFact's users write declarative claims, a support desk's users write "how do I ..." questions, and a
query writer shown generic questions writes generic questions whatever the corpus. ``sdg.examples`` names
a JSONL file, one example a line::

    {"query": "Autophagy deficiency in the liver increases insulin resistance.", "passage": "...", "title": "..."}
    {"query": "how do I read a file line by line", "doc_id": "tutorial/inputoutput"}

A row gives the passage itself, or the ``doc_id`` of a corpus document (its first chunk is shown). The
local generator builds its few-shot prompt from them; the llm generator shows the queries as style examples.
The eval stage drops these queries from a real query set, so no example is scored as if unseen.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_validator

from embedtune.schemas import Chunk, read_rows_numbered
from embedtune.sdg.base import SdgError


class ExampleRow(BaseModel):
    """One line of the examples file (other keys, e.g. a BEIR ``_id``, are ignored)."""

    model_config = ConfigDict(extra="ignore")
    query: str
    passage: str | None = None
    doc_id: str | None = None
    title: str = ""

    @field_validator("query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the query is empty")
        return " ".join(value.split())


@dataclass(frozen=True)
class Example:
    query: str
    passage: str
    title: str = ""
    doc_id: str = ""

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def load_examples(path: str | Path, chunks: Sequence[Chunk] = ()) -> list[Example]:
    """The examples in ``path``; a ``doc_id`` row takes the passage of that document's first chunk.

    Errors name the file and line: an unreadable line, a row with neither passage nor doc_id, a doc_id the
    corpus does not hold."""
    path = Path(path).expanduser()
    first_chunk: dict[str, Chunk] = {}
    for c in chunks:
        first_chunk.setdefault(c.doc_id, c)
    out = []
    for lineno, row in read_rows_numbered(path, ExampleRow):
        if row.passage and row.passage.strip():
            out.append(Example(row.query, " ".join(row.passage.split()), row.title.strip(), row.doc_id or ""))
        elif row.doc_id:
            chunk = first_chunk.get(row.doc_id)
            if chunk is None:
                raise SdgError(f"{path}:{lineno}: doc_id {row.doc_id!r} is not a document of the corpus")
            out.append(Example(row.query, chunk.text, row.title.strip() or chunk.title, row.doc_id))
        else:
            raise SdgError(f"{path}:{lineno}: an example needs its passage or the doc_id of a corpus document")
    if not out:
        raise SdgError(f"{path}: holds no example query")
    return out


def file_digest(path: str | Path) -> str:
    return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()


_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"\w+")


def focused_passage(example: Example, max_words: int) -> str:
    """The example's passage cut to about ``max_words`` words around what its query asks: the sentences
    sharing most words with the query, kept in their original order (a prompt shows the evidence, not the
    abstract's opening lines that a plain cut would keep)."""
    sentences = [s for s in _SENTENCE.split(example.passage) if s.strip()]
    if sum(len(s.split()) for s in sentences) <= max_words:
        return example.passage
    asked = {w.lower() for w in _WORD.findall(example.query)}
    order = sorted(range(len(sentences)),
                   key=lambda i: (-len(asked & {w.lower() for w in _WORD.findall(sentences[i])}), i))
    picked: list[int] = []
    words = 0
    for i in order:
        n = len(sentences[i].split())
        if picked and words + n > max_words:
            continue
        picked.append(i)
        words += n
    text = " ".join(sentences[i] for i in sorted(picked))
    return " ".join(text.split()[:max_words])


def titled(title: str, text: str) -> str:
    """"Title. Text" as the query writer reads a passage (no second full stop after a title that has one:
    the model imitates whatever punctuation its prompt shows)."""
    title = title.strip()
    if not title:
        return text
    return f"{title} {text}" if title[-1] in ".!?:" else f"{title}. {text}"
