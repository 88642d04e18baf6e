"""Typed rows of the artifacts that stages hand to each other (see DESIGN.md, run directory)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from embedtune.artifacts import ArtifactError, RunDir, read_jsonl_lines


def passage_text(title: str, text: str) -> str:
    """What a retriever embeds and BM25-indexes for a titled passage: the title and the text joined as
    BEIR's dense retrievers do. One join for every stage: sdg's round trip, prep's mining and teacher, the
    training rows, eval's corpus and the deployed index (a model trained on text alone and scored on
    title + text learns one thing and is judged on another)."""
    return f"{title} {text}".strip() if title else text


class Row(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Chunk(Row):
    """``corpus/chunks.jsonl``: a passage of a document; BEIR-compatible (_id, title, text)."""

    id: str = Field(alias="_id")
    doc_id: str
    title: str = ""
    text: str
    source: str = ""
    start: int = 0
    end: int = 0
    section: str = ""  # heading path where the chunk starts ("Guide > Install"); Markdown documents only

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @property
    def passage(self) -> str:
        """The text embedded and indexed for this chunk (:func:`passage_text`)."""
        return passage_text(self.title, self.text)

    def beir(self) -> dict[str, str]:
        return {"_id": self.id, "title": self.title, "text": self.text}


class QueryScores(Row):
    relevance: float | None = None
    accuracy: float | None = None
    context_support: float | None = None
    clarity: float | None = None
    overall: float | None = None


class GeneratorInfo(Row):
    kind: str
    model: str = ""


class QueryFields(Row):
    """What a generated query is: shared by the generators' :class:`~embedtune.sdg.Candidate` (before the
    filters) and :class:`SyntheticQuery` (the row written), so a new field is declared once."""

    text: str
    answer: str = ""
    positive_ids: list[str]
    doc_id: str = ""
    query_type: str = ""
    reasoning_type: str = ""
    complexity: int | None = None
    hops: int = 1
    scores: QueryScores = Field(default_factory=QueryScores)
    roundtrip_rank: int | None = Field(None, description="base model's rank of the best positive (1 = top)")


class SyntheticQuery(QueryFields):
    """``sdg/queries.jsonl``: a generated query and the chunk ids that answer it."""

    id: str = Field(alias="_id")
    generator: GeneratorInfo

    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class TrainExample(Row):
    """``prep/train.jsonl``: the inline training format (NeMo AutoModel compatible, plus ids and scores)."""

    query: str
    pos_doc: list[str]
    neg_doc: list[str]
    query_id: str
    pos_ids: list[str]
    neg_ids: list[str]
    pos_scores: list[float] = Field(default_factory=list)
    neg_scores: list[float] = Field(default_factory=list)


R = TypeVar("R", bound=BaseModel)


def read_rows(path: str | Path, model: type[R]) -> Iterator[R]:
    """Read JSONL as typed rows; a malformed or invalid line raises ArtifactError naming file and line."""
    for _, row in read_rows_numbered(path, model):
        yield row


def read_rows_numbered(path: str | Path, model: type[R]) -> Iterator[tuple[int, R]]:
    """Like :func:`read_rows`, with each row's line number for the caller's own checks."""
    for lineno, obj in read_jsonl_lines(path):
        try:
            row = model.model_validate(obj)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(map(str, first["loc"])) or "row"
            raise ArtifactError(f"{path}:{lineno}: {where}: {first['msg']}") from None
        yield lineno, row


def load_chunks(run: RunDir) -> list[Chunk]:
    """A finished corpus stage's chunks (what every later stage reads first)."""
    return list(read_rows(run.require("corpus", "chunks.jsonl"), Chunk))


def query_key(text: str) -> str:
    """How two query texts are compared: lower case, words only (the eval stage drops real queries that
    were shown to the query writer as examples, whatever their punctuation or spacing)."""
    return " ".join(re.findall(r"\w+", text.lower()))
