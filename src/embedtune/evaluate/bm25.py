"""BM25 metrics: the lexical reference row of every report."""

from __future__ import annotations

from collections.abc import Sequence

from embedtune.retrieval.beir import BeirDataset
from embedtune.retrieval.bm25 import BM25Index
from embedtune.retrieval.metrics import compute_metrics
from embedtune.retrieval.search import to_run


def evaluate_bm25(dataset: BeirDataset, k_values: Sequence[int] = (1, 5, 10, 100), top_k: int = 100,
                  ignore_identical_ids: bool = False, stopwords: str | None = "en",
                  index: BM25Index | None = None) -> dict[str, float]:
    """BM25 metrics on ``dataset`` (``index``: one already built over its corpus, in order)."""
    qids, dids = list(dataset.queries), list(dataset.corpus)
    k = max(top_k, max(k_values)) + int(ignore_identical_ids)  # room for the query's own id, dropped below
    index = index or BM25Index(dataset.passages(dids), stopwords)
    scores, idx = index.search([dataset.queries[q] for q in qids], k)
    # BM25 gives zero to documents sharing no term with the query: they are not retrieved.
    run = to_run(qids, dids, scores, idx, ignore_identical_ids)
    run = {q: {d: s for d, s in hits.items() if s > 0} for q, hits in run.items()}
    return compute_metrics(dataset.qrels, run, k_values)
