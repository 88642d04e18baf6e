"""BM25 metrics: the lexical reference row of every report."""

from __future__ import annotations

from embedtune.retrieval.beir import BeirDataset
from embedtune.retrieval.bm25 import BM25Index
from embedtune.retrieval.metrics import DEFAULT_RANKING, PerQuery, RankingSpec, compute_metrics


def evaluate_bm25(dataset: BeirDataset, ranking: RankingSpec = DEFAULT_RANKING, stopwords: str | None = "en",
                  index: BM25Index | None = None, per_query: PerQuery | None = None) -> dict[str, float]:
    """BM25 metrics on ``dataset`` (``index``: one already built over its corpus, in order)."""
    qids, dids = list(dataset.queries), list(dataset.corpus)
    index = index or BM25Index(dataset.passages(dids), stopwords)
    scores, idx = index.search([dataset.queries[q] for q in qids], ranking.depth)
    # BM25 gives zero to documents sharing no term with the query: they are not retrieved.
    run = ranking.to_run(qids, dids, scores, idx)
    run = {q: {d: s for d, s in hits.items() if s > 0} for q, hits in run.items()}
    return compute_metrics(dataset.qrels, run, ranking.k_values, per_query=per_query)
