"""BEIR metrics via pytrec_eval (trec_eval semantics, as BEIR and MTEB compute them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from embedtune.retrieval.beir import BeirDataset

METRIC_NAMES = ("ndcg", "recall", "precision", "map")
# Kept per query for every retrieval (``eval/results.json`` ``per_query``): what paired tests run on.
PER_QUERY = ("ndcg@10", "recall@10")
#: The figures a summary shows (eval's report, plot and manifest, the run summary, the deployed check).
HEADLINE = ("ndcg@10", "recall@10", "map@10")
#: The wider table ``embedtune eval`` prints.
DETAILED = ("ndcg@1", "ndcg@10", "recall@10", "recall@100", "precision@10", "map@10", "mrr@10")

PerQuery = dict[str, dict[str, float]]  # query id -> {metric: value}


@dataclass(frozen=True)
class RankingSpec:
    """How a ranking is retrieved and scored: the metric cutoffs, the hits kept per query, and whether a hit
    with the query's own id is dropped (BEIR's ``ignore_identical_ids``, for datasets whose queries are
    also documents)."""

    k_values: tuple[int, ...] = (1, 5, 10, 100)
    top_k: int = 100
    ignore_identical_ids: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "k_values", tuple(int(k) for k in self.k_values))
        if not self.k_values or min(self.k_values) < 1 or self.top_k < 1:
            raise ValueError(f"k_values must be positive cutoffs and top_k >= 1, got {self.k_values}, {self.top_k}")

    @classmethod
    def of(cls, cfg: Any) -> RankingSpec:
        """From any settings holding the three fields (``EvalConfig``, a platform job spec's values)."""
        return cls(tuple(cfg.k_values), cfg.top_k, cfg.ignore_identical_ids)

    @property
    def depth(self) -> int:
        """Hits to retrieve per query: one extra so that dropping the query's own id still leaves ``top_k``."""
        return max(self.top_k, max(self.k_values)) + int(self.ignore_identical_ids)

    def cut_at(self, *k_values: int) -> RankingSpec:
        return RankingSpec(k_values, self.top_k, self.ignore_identical_ids)

    def to_run(self, query_ids: list[str], doc_ids: list[str], scores: np.ndarray,
               idx: np.ndarray) -> dict[str, dict[str, float]]:
        from embedtune.retrieval.search import to_run  # torch: loaded only when a run is built

        return to_run(query_ids, doc_ids, scores, idx, self.ignore_identical_ids)


DEFAULT_RANKING = RankingSpec()


def compute_metrics(
    qrels: dict[str, dict[str, int]],
    run: dict[str, dict[str, float]],
    k_values: Sequence[int] = (1, 5, 10, 100),
    mrr_k: int = 10,
    per_query: PerQuery | None = None,
) -> dict[str, float]:
    """Mean nDCG/Recall/Precision/MAP at each k, plus MRR@``mrr_k``, keyed like ``"ndcg@10"``.

    Averaged over the queries in ``qrels`` (a query with no retrieved documents scores 0), as BEIR does.
    ``per_query``, when given, is filled with each query's :data:`PER_QUERY` values (those whose cutoff is
    in ``k_values``).
    """
    ks = ",".join(map(str, k_values))
    measures = {f"ndcg_cut.{ks}", f"recall.{ks}", f"P.{ks}", f"map_cut.{ks}"}
    import pytrec_eval

    evaluator = pytrec_eval.RelevanceEvaluator(qrels, measures)
    # Queries absent from the run would be skipped by pytrec_eval; BEIR counts them as zeros.
    per_query_all = evaluator.evaluate({q: run.get(q, {}) or {"__none__": 0.0} for q in qrels})
    n = max(1, len(qrels))
    out: dict[str, float] = {}
    for k in k_values:
        for name, key in (("ndcg", "ndcg_cut"), ("recall", "recall"), ("precision", "P"), ("map", "map_cut")):
            out[f"{name}@{k}"] = sum(v[f"{key}_{k}"] for v in per_query_all.values()) / n
    out[f"mrr@{mrr_k}"] = sum(_mrr(qrels[q], run.get(q, {}), mrr_k) for q in qrels) / n
    if per_query is not None:
        trec = {"ndcg": "ndcg_cut", "recall": "recall"}
        wanted = {m: f"{trec[name]}_{k}" for m in PER_QUERY for name, k in [m.split("@")] if int(k) in k_values}
        for q in qrels:
            per_query[q] = {m: float(per_query_all[q][key]) for m, key in wanted.items()}
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
    ranking: RankingSpec = DEFAULT_RANKING,
    dimensions: int | None = None,
    backend: str = "exact",
    per_query: PerQuery | None = None,
) -> dict[str, float]:
    """Metrics of already-computed, L2-normalised embeddings (truncated to ``dimensions`` if given);
    ``per_query`` as in :func:`compute_metrics`."""
    if dimensions is not None:
        query_emb, doc_emb = truncate(query_emb, dimensions), truncate(doc_emb, dimensions)
    from embedtune.retrieval.search import search

    scores, idx = search(query_emb, doc_emb, top_k=ranking.depth, backend=backend)
    return compute_metrics(dataset.qrels, ranking.to_run(query_ids, doc_ids, scores, idx), ranking.k_values,
                           per_query=per_query)


def truncate(emb: np.ndarray, dims: int) -> np.ndarray:
    """Matryoshka: the first ``dims`` values of each row, L2-normalised again."""
    cut = emb[:, :dims]
    return cut / np.clip(np.linalg.norm(cut, axis=1, keepdims=True), 1e-12, None)
