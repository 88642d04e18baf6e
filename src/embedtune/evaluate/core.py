"""Encode (through the cache), search, score: one model on one BEIR dataset."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from embedtune.evaluate.beir import BeirDataset
from embedtune.evaluate.cache import EmbeddingCache, encode_cached
from embedtune.evaluate.encoders import LocalEncoder
from embedtune.evaluate.hybrid import evaluate_hybrid
from embedtune.evaluate.metrics import compute_metrics
from embedtune.evaluate.retrieval import search, to_run

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from embedtune.evaluate.bm25 import BM25Index
    from embedtune.evaluate.encoders import Encoder


def evaluate_embeddings(
    dataset: BeirDataset,
    query_ids: list[str],
    query_emb: np.ndarray,
    doc_ids: list[str],
    doc_emb: np.ndarray,
    k_values: Sequence[int] = (1, 5, 10, 100),
    top_k: int = 100,
    ignore_identical_ids: bool = False,
    dimensions: int | None = None,
    backend: str = "exact",
) -> dict[str, float]:
    """Metrics of already-computed, L2-normalised embeddings (truncated to ``dimensions`` if given)."""
    if dimensions is not None:
        query_emb, doc_emb = _truncate(query_emb, dimensions), _truncate(doc_emb, dimensions)
    # One extra hit so that dropping a query's own id (ignore_identical_ids) still leaves top_k.
    k = max(top_k, max(k_values)) + int(ignore_identical_ids)
    scores, idx = search(query_emb, doc_emb, top_k=k, backend=backend)
    run = to_run(query_ids, doc_ids, scores, idx, ignore_identical_ids)
    return compute_metrics(dataset.qrels, run, k_values)


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

    def to_json(self) -> dict[str, object]:
        return {"label": self.label, "dim": self.dim, **self.metrics,
                "encode_seconds": round(self.encode_seconds, 3), "docs_per_second": self.docs_per_second}


def evaluate_encoder(
    encoder: Encoder,
    dataset: BeirDataset,
    *,
    cache: EmbeddingCache | None = None,
    k_values: Sequence[int] = (1, 5, 10, 100),
    top_k: int = 100,
    ignore_identical_ids: bool = False,
    dims: Sequence[int] = (),
    backend: str = "exact",
    bm25_index: BM25Index | None = None,
    bm25_weight: float = 0.0,
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
    score = dict(k_values=k_values, top_k=top_k, ignore_identical_ids=ignore_identical_ids, backend=backend)
    metrics = evaluate_embeddings(dataset, qids, q, dids, d, **score)
    by_dim = {full: metrics}
    for dim in sorted({int(x) for x in dims if 0 < int(x) < full}, reverse=True):
        by_dim[dim] = evaluate_embeddings(dataset, qids, q, dids, d, dimensions=dim, **score)
    hybrid = None
    if bm25_index is not None and bm25_weight > 0:
        hybrid = evaluate_hybrid(dataset, qids, q, dids, d, bm25_index, bm25_weight, k_values, top_k,
                                 ignore_identical_ids)
    # A rate only when the corpus was really encoded (a cache read says nothing about the model's speed).
    rate = round(len(dids) / t_docs, 2) if not corpus_cached and t_docs > 0 and dids else None
    return ModelResult(encoder.label, full, metrics, by_dim, seconds, rate, hybrid)


def evaluate_model(
    model: SentenceTransformer,
    dataset: BeirDataset,
    k_values: Sequence[int] = (1, 5, 10, 100),
    top_k: int = 100,
    batch_size: int = 64,
    ignore_identical_ids: bool = False,
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
    return evaluate_encoder(encoder, dataset, cache=cache, k_values=k_values, top_k=top_k,
                            ignore_identical_ids=ignore_identical_ids).metrics


def _truncate(emb: np.ndarray, dims: int) -> np.ndarray:
    cut = emb[:, :dims]
    return cut / np.clip(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12, None)

