"""Eval stage: BEIR retrieval metrics for a model (base, fine-tuned, served) on a BEIR dataset.

Core API, importable on its own:
- :func:`load_beir` — strict BEIR loading (optionally queries from another folder: cross-lingual);
- :func:`evaluate_model` — encode, exact dense search, pytrec_eval metrics;
- :func:`dense_search`, :func:`compute_metrics` — the pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from embedtune.evaluate.beir import BeirDataset, load_beir
from embedtune.evaluate.metrics import compute_metrics
from embedtune.evaluate.retrieval import dense_search, to_run

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

__all__ = ["BeirDataset", "compute_metrics", "dense_search", "evaluate_embeddings", "evaluate_model",
           "load_beir", "to_run"]


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
) -> dict[str, float]:
    """Metrics of already-computed, L2-normalised embeddings (truncated to ``dimensions`` if given)."""
    if dimensions is not None:
        query_emb, doc_emb = _truncate(query_emb, dimensions), _truncate(doc_emb, dimensions)
    scores, idx = dense_search(query_emb, doc_emb, top_k=max(top_k, max(k_values)))
    run = to_run(query_ids, doc_ids, scores, idx, ignore_identical_ids)
    return compute_metrics(dataset.qrels, run, k_values)


def evaluate_model(
    model: SentenceTransformer,
    dataset: BeirDataset,
    k_values: Sequence[int] = (1, 5, 10, 100),
    top_k: int = 100,
    batch_size: int = 64,
    ignore_identical_ids: bool = False,
    show_progress: bool = False,
) -> dict[str, float]:
    """Encode queries (query prompt) and corpus (passage prompt), retrieve, score."""
    from embedtune.models import encode_passages, encode_queries

    qids, dids = list(dataset.queries), list(dataset.corpus)
    q = encode_queries(model, [dataset.queries[i] for i in qids], batch_size, show_progress)
    d = encode_passages(model, dataset.passages(dids), batch_size, show_progress)
    return evaluate_embeddings(dataset, qids, q, dids, d, k_values, top_k, ignore_identical_ids)


def _truncate(emb: np.ndarray, dims: int) -> np.ndarray:
    cut = emb[:, :dims]
    return cut / np.clip(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12, None)
