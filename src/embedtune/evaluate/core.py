"""Encode (through the cache), search, score: one model on one BEIR dataset."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from embedtune.evaluate.hybrid import evaluate_hybrid
from embedtune.retrieval.beir import BeirDataset
from embedtune.retrieval.cache import EmbeddingCache, encode_cached
from embedtune.retrieval.encoders import LocalEncoder
from embedtune.retrieval.metrics import DEFAULT_RANKING, PerQuery, RankingSpec, evaluate_embeddings

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from embedtune.retrieval.bm25 import BM25Index
    from embedtune.retrieval.encoders import Encoder


@dataclass
class ModelResult:
    """One model on one dataset: metrics at the full dimension and at each swept dimension."""

    label: str
    dim: int
    metrics: dict[str, float]
    by_dim: dict[int, dict[str, float]] = field(default_factory=dict)
    encode_seconds: float = 0.0  # wall time to get the embeddings (encoding or reading the cache)
    docs_per_second: float | None = None  # None when the corpus came from the cache
    hybrid: dict[str, float] | None = None  # fused with BM25, when a BM25 index was given
    hybrid_sweep: dict[float, float] = field(default_factory=dict)  # BM25 weight -> fused nDCG@10
    #: per-query scores of each retrieval: "dense", "hybrid", and "@<dims>" for each swept dimension
    per_query: dict[str, PerQuery] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return {"label": self.label, "dim": self.dim, **self.metrics,
                "encode_seconds": round(self.encode_seconds, 3), "docs_per_second": self.docs_per_second}


def evaluate_encoder(
    encoder: Encoder,
    dataset: BeirDataset,
    *,
    cache: EmbeddingCache | None = None,
    ranking: RankingSpec = DEFAULT_RANKING,
    dims: Sequence[int] = (),
    backend: str = "exact",
    bm25_index: BM25Index | None = None,
    bm25_weight: float = 0.0,
    weight_grid: Sequence[float] = (),
) -> ModelResult:
    """Encode queries and corpus once (cached), then score at full dimension and at each of ``dims``,
    and fused with BM25 when ``bm25_index`` (over the dataset's corpus, in order) and a weight are given."""
    qids, dids = list(dataset.queries), list(dataset.corpus)
    hits_before = cache.hits if cache is not None else 0
    t0 = time.perf_counter()
    d = encode_cached(encoder, dataset.passages(dids), "passage", cache, what=f"{dataset.name} corpus")
    t_docs = time.perf_counter() - t0
    corpus_cached = cache is not None and cache.hits > hits_before
    q = encode_cached(encoder, [dataset.queries[i] for i in qids], "query", cache,
                      what=f"{dataset.name} queries")
    seconds = time.perf_counter() - t0
    full = int(d.shape[1]) if d.size else int(q.shape[1])
    per_query: dict[str, PerQuery] = {"dense": {}}
    metrics = evaluate_embeddings(dataset, qids, q, dids, d, ranking, backend=backend, per_query=per_query["dense"])
    by_dim = {full: metrics}
    for dim in sorted({int(x) for x in dims if 0 < int(x) < full}, reverse=True):
        per_query[f"@{dim}"] = {}
        by_dim[dim] = evaluate_embeddings(dataset, qids, q, dids, d, ranking, dimensions=dim, backend=backend,
                                          per_query=per_query[f"@{dim}"])
    hybrid = None
    if bm25_index is not None and bm25_weight > 0:
        per_query["hybrid"] = {}
        hybrid = evaluate_hybrid(dataset, qids, q, dids, d, bm25_index, bm25_weight, ranking,
                                 per_query=per_query["hybrid"])
    sweep = {}
    if bm25_index is not None:  # nDCG@10 of the fusion at each weight: how the run picks the weight it deploys
        for w in sorted(set(weight_grid)):
            fused = evaluate_hybrid(dataset, qids, q, dids, d, bm25_index, w, ranking.cut_at(10))
            sweep[float(w)] = fused["ndcg@10"]
    # A rate only when the corpus was really encoded (a cache read says nothing about the model's speed).
    rate = round(len(dids) / t_docs, 2) if not corpus_cached and t_docs > 0 and dids else None
    return ModelResult(encoder.label, full, metrics, by_dim, seconds, rate, hybrid, sweep, per_query)


def evaluate_model(
    model: SentenceTransformer,
    dataset: BeirDataset,
    ranking: RankingSpec = DEFAULT_RANKING,
    batch_size: int = 64,
    show_progress: bool = False,
    *,
    cache: EmbeddingCache | None = None,
    fingerprint: str | None = None,
) -> dict[str, float]:
    """Encode queries (query prompt) and corpus (passage prompt), retrieve, score.

    With ``cache`` and the weights' ``fingerprint`` (:func:`model_fingerprint`), embeddings are reused.
    ``show_progress`` is kept for compatibility: progress bars show whenever stderr is a terminal.
    """
    encoder = LocalEncoder(model, fingerprint, batch_size=batch_size)
    return evaluate_encoder(encoder, dataset, cache=cache, ranking=ranking).metrics
