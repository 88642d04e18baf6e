"""Metrics of hybrid retrieval (dense fused with BM25, :mod:`embedtune.retrieval.fusion`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from embedtune.retrieval.fusion import hybrid_search
from embedtune.retrieval.metrics import DEFAULT_RANKING, PerQuery, RankingSpec, compute_metrics

if TYPE_CHECKING:
    from embedtune.retrieval.beir import BeirDataset
    from embedtune.retrieval.bm25 import BM25Index


def evaluate_hybrid(dataset: BeirDataset, query_ids: list[str], query_emb: np.ndarray, doc_ids: list[str],
                    doc_emb: np.ndarray, index: BM25Index, bm25_weight: float,
                    ranking: RankingSpec = DEFAULT_RANKING, per_query: PerQuery | None = None) -> dict[str, float]:
    """Metrics of dense + BM25 fusion, given a model's embeddings and a BM25 index over ``doc_ids``."""
    texts = [dataset.queries[q] for q in query_ids]
    scores, idx = hybrid_search(texts, query_emb, doc_emb, index, bm25_weight, ranking.depth)
    return compute_metrics(dataset.qrels, ranking.to_run(query_ids, doc_ids, scores, idx), ranking.k_values,
                           per_query=per_query)
