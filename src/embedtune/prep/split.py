"""Validate the synthetic queries and split them into train and test by DOCUMENT.

Splitting by query would leak: two queries about the same passage would land on both sides, and the
fine-tuned model would be graded on text it was trained to retrieve. So documents are split, and a query
follows the documents of its positive chunks.

Decisions (counted in the manifest):
- Only documents that carry at least one query's positive are split at ``test_ratio``; documents without
  queries stay in the training pool (they can only ever be negatives there, and they are in the eval corpus
  anyway, as all chunks are). This keeps the share of test *queries* near ``test_ratio``.
- A query whose positives span train and test documents goes to TEST (``mixed_to_test``): training never
  sees a test document's chunk as a positive, and the query is not wasted. Its train-side positive stays
  a valid relevant passage in the eval corpus.
- A query with more than ``max_pos_docs`` positive chunks is dropped (``dropped_too_many_positives``).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from embedtune.artifacts import ArtifactError, read_jsonl_lines
from embedtune.schemas import Chunk, SyntheticQuery


@dataclass
class Split:
    train: list[SyntheticQuery]
    test: list[SyntheticQuery]
    train_docs: set[str]
    test_docs: set[str]
    counts: dict[str, int] = field(default_factory=dict)


def load_queries(path: Path, chunk_ids: set[str]) -> list[SyntheticQuery]:
    """Read ``sdg/queries.jsonl``; any unusable row is an error naming the file, line and query."""
    queries: list[SyntheticQuery] = []
    seen: dict[str, int] = {}
    for lineno, obj in read_jsonl_lines(path):
        where = f"{path}:{lineno}"
        try:
            q = SyntheticQuery.model_validate(obj)
        except ValidationError as exc:
            first = exc.errors()[0]
            key = ".".join(map(str, first["loc"])) or "row"
            raise ArtifactError(f"{where}: {key}: {first['msg']}") from None
        if not q.text.strip():
            raise ArtifactError(f"{where}: query {q.id!r} has empty text")
        if not q.positive_ids:
            raise ArtifactError(f"{where}: query {q.id!r} has no positive_ids")
        unknown = [pid for pid in q.positive_ids if pid not in chunk_ids]
        if unknown:
            raise ArtifactError(
                f"{where}: query {q.id!r} names positive id(s) {unknown[:5]} that are not in "
                "corpus/chunks.jsonl (was sdg run on another corpus? rerun `embedtune sdg --force`)"
            )
        if q.id in seen:
            raise ArtifactError(f"{where}: duplicate query id {q.id!r} (first on line {seen[q.id]})")
        seen[q.id] = lineno
        q.positive_ids = list(dict.fromkeys(q.positive_ids))  # a repeated id is one positive, not two
        queries.append(q)
    if not queries:
        raise ArtifactError(f"{path}: no queries; rerun `embedtune sdg`")
    return queries


def split_by_document(queries: list[SyntheticQuery], chunks: list[Chunk], *, test_ratio: float, seed: int,
                      max_pos_docs: int) -> Split:
    doc_of = {c.id: c.doc_id for c in chunks}
    kept = [q for q in queries if len(q.positive_ids) <= max_pos_docs]
    counts = Counter(queries_in=len(queries), dropped_too_many_positives=len(queries) - len(kept))

    bearing = sorted({doc_of[pid] for q in kept for pid in q.positive_ids})
    random.Random(seed).shuffle(bearing)
    test_docs = set(bearing[: _n_test(len(bearing), test_ratio)])
    train_docs = {c.doc_id for c in chunks} - test_docs

    train, test = [], []
    for q in kept:
        sides = {doc_of[pid] in test_docs for pid in q.positive_ids}
        if True in sides:
            test.append(q)
            counts["mixed_to_test"] += len(sides) == 2
        else:
            train.append(q)
    counts.update(train_queries=len(train), test_queries=len(test), documents=len(set(doc_of.values())),
                  train_documents=len(train_docs), test_documents=len(test_docs))
    return Split(train, test, train_docs, test_docs, dict(counts))


def _n_test(n_docs: int, ratio: float) -> int:
    """Round to the nearest document, but hold out at least one and keep at least one for training."""
    if ratio <= 0 or n_docs < 2:
        return 0
    return min(n_docs - 1, max(1, round(n_docs * ratio)))
