"""BEIR metrics via pytrec_eval (trec_eval semantics, as BEIR and MTEB compute them)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pytrec_eval

from embedtune.retrieval.search import search, to_run

if TYPE_CHECKING:
    from embedtune.retrieval.beir import BeirDataset

METRIC_NAMES = ("ndcg", "recall", "precision", "map")


def compute_metrics(
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    k_values: Sequence[int] = (1, 5, 10, 100),
    mrr_k: int = 10,
) -> dict[str, float]:
    """Mean nDCG/Recall/Precision/MAP at each k, plus MRR@``mrr_k``, keyed like ``"ndcg@10"``.

    Averaged over the queries in ``qrels`` (a query with no retrieved documents scores 0), as BEIR does.
    """
    ks = ",".join(map(str, k_values))
    measures = {f"ndcg_cut.{ks}", f"recall.{ks}", f"P.{ks}", f"map_cut.{ks}"}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, measures)
    # Queries absent from the run would be skipped by pytrec_eval; BEIR counts them as zeros.
    per_query = evaluator.evaluate({q: run.get(q, {}) or {"__none__": 0.0} for q in qrels})
    n = max(1, len(qrels))
    out: dict[str, float] = {}
    for k in k_values:
        for name, key in (("ndcg", "ndcg_cut"), ("recall", "recall"), ("precision", "P"), ("map", "map_cut")):
            out[f"{name}@{k}"] = sum(v[f"{key}_{k}"] for v in per_query.values()) / n
    out[f"mrr@{mrr_k}"] = sum(_mrr(qrels[q], run.get(q, {}), mrr_k) for q in qrels) / n
    return out


def _mrr(rels: dict[str, int], hits: dict[str, float], k: int) -> float:
    # pytrec_eval's recip_rank has no cutoff; MRR@k is computed on the top-k ranking directly.
    ranked = sorted(hits.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    for rank, (did, _) in enumerate(ranked, 1):
        if rels.get(did, 0) > 0:
            return 1.0 / rank
    return 0.0


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
        query_emb, doc_emb = truncate(query_emb, dimensions), truncate(doc_emb, dimensions)
    # One extra hit so that dropping a query's own id (ignore_identical_ids) still leaves top_k.
    k = max(top_k, max(k_values)) + int(ignore_identical_ids)
    scores, idx = search(query_emb, doc_emb, top_k=k, backend=backend)
    run = to_run(query_ids, doc_ids, scores, idx, ignore_identical_ids)
    return compute_metrics(dataset.qrels, run, k_values)


def truncate(emb: np.ndarray, dims: int) -> np.ndarray:
    """Matryoshka: the first ``dims`` values of each row, L2-normalised again."""
    cut = emb[:, :dims]
    return cut / np.clip(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12, None)
