"""Deployed equals evaluated: a run's Milvus index scored through the store, beside the same chunks scored
in-process with eval's exact search and fusion.

Hits are chunks. Qrels that name chunks (the run's own held-out queries) score the chunks; qrels that
name documents (a user's BEIR set) score each document as its best chunk (max-passage, the usual
aggregation for chunked corpora). The in-process side reads the chunk vectors back from the store, so both
sides rank exactly the same vectors: any difference is the store's search and fusion, nothing else.

The deploy stage also holds the store's figure against the eval stage's own (:func:`against_eval`, the
recipe's tolerances: 0.03 at k < 5, 0.01 at k >= 5) when eval scored the same chunks; and a deployed
search that finds nothing relevant never passes, whatever it is compared with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from embedtune.console import log
from embedtune.retrieval.beir import BeirDataset
from embedtune.retrieval.bm25 import BM25Index
from embedtune.retrieval.fusion import hybrid_search
from embedtune.retrieval.metrics import HEADLINE, compute_metrics
from embedtune.retrieval.milvus import Hit, MilvusSearcher
from embedtune.retrieval.search import dense_search

# What "the same figure" means: nDCG@10 of the deployed search within this of the in-process one.
TOLERANCE = {"hybrid": 0.01, "dense": 0.005, "bm25": 0.02}
#: The summary figures and recall@100, which tells an empty ranking from a poor one.
CHECKED = (*HEADLINE, "recall@100")


@dataclass
class DeployedResult:
    deployed: dict[str, dict[str, float]]  # mode -> metrics through the store
    exact: dict[str, dict[str, float]]  # mode -> metrics in-process on the same chunks
    chunks: int
    queries: int
    bm25_weight: float
    fusion: str
    failures: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    level: str = "document"  # what the qrels name: "chunk" or "document"

    def to_json(self) -> dict[str, Any]:
        delta = {m: round(self.deployed[m]["ndcg@10"] - self.exact[m]["ndcg@10"], 5) for m in self.deployed
                 if m in self.exact}
        return {"deployed": self.deployed, "exact": self.exact, "delta_ndcg@10": delta, "chunks": self.chunks,
                "queries": self.queries, "bm25_weight": self.bm25_weight, "fusion": self.fusion,
                "tolerance": TOLERANCE, "failures": self.failures, "passed": not self.failures,
                "seconds": self.seconds, "qrels_level": self.level}


def evaluate_index(searcher: MilvusSearcher, dataset: BeirDataset, k_values: Sequence[int] = (1, 5, 10, 100),
                   modes: Sequence[str] = ("dense", "bm25", "hybrid"), chunk_k: int = 300,
                   stopwords: str | None = "en", query_batch: int = 64) -> DeployedResult:
    """Score ``modes`` through the store and in-process; check each against :data:`TOLERANCE`."""
    import time

    qids = list(dataset.queries)
    texts = [dataset.queries[q] for q in qids]
    t0 = time.perf_counter()
    vectors = np.asarray(searcher.embed(texts), dtype=np.float32)[:, : searcher.dimension]
    vectors /= np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    seconds = {"embed_queries": time.perf_counter() - t0}
    rows = searcher.all_chunks(fields=("id", "doc_id", "text", "dense"))
    level = qrels_level(dataset, rows)
    # Chunk-level qrels: each chunk is its own "document" for scoring.
    chunk_doc = [r["id"] if level == "chunk" else r["doc_id"] for r in rows]
    chunk_vec = np.asarray([r["dense"] for r in rows], dtype=np.float32)
    exact_runs = _exact_runs(modes, texts, vectors, rows, chunk_doc, chunk_vec, searcher.settings.bm25_weight,
                             chunk_k, stopwords)
    deployed, exact, failures = {}, {}, []
    for mode in modes:
        t0 = time.perf_counter()
        hits: list[list[Hit]] = []
        for start in range(0, len(texts), query_batch):
            hits += searcher.search(texts[start:start + query_batch], mode=mode, top_k=chunk_k,  # type: ignore[arg-type]
                                    with_text=False, query_vectors=vectors[start:start + query_batch])
        seconds[f"search_{mode}"] = time.perf_counter() - t0
        key = (lambda h: h.id) if level == "chunk" else (lambda h: h.doc_id)
        run = {q: best_per_document([(key(h), h.score) for h in row]) for q, row in zip(qids, hits, strict=True)}
        deployed[mode] = compute_metrics(dataset.qrels, run, k_values)
        exact[mode] = compute_metrics(dataset.qrels, dict(zip(qids, exact_runs[mode], strict=True)), k_values)
        gap = abs(deployed[mode]["ndcg@10"] - exact[mode]["ndcg@10"])
        log.info("index %s: nDCG@10 deployed %.4f, in-process %.4f (|Δ| %.4f)", mode,
                 deployed[mode]["ndcg@10"], exact[mode]["ndcg@10"], gap)
        if gap > TOLERANCE.get(mode, 0.01) + 1e-9:
            failures.append(f"{mode}: deployed nDCG@10 {deployed[mode]['ndcg@10']:.4f} vs in-process "
                            f"{exact[mode]['ndcg@10']:.4f} (|Δ| {gap:.4f} > {TOLERANCE.get(mode, 0.01)})")
        if qids and deployed[mode]["ndcg@10"] == 0 and deployed[mode].get("recall@100", 0) == 0:
            failures.append(f"{mode}: the deployed search found no relevant {level} for any of {len(qids)} "
                            "queries: the qrels name ids this index does not hold, or the index is broken")
    return DeployedResult(deployed, exact, len(rows), len(qids), searcher.settings.bm25_weight,
                          searcher.settings.fusion, failures, {k: round(v, 2) for k, v in seconds.items()}, level)


def qrels_level(dataset: BeirDataset, rows: Sequence[dict]) -> str:
    """"chunk" when the qrels name chunks of the index, "document" when they name documents."""
    judged = {d for rels in dataset.qrels.values() for d in rels}
    chunk_ids = {r["id"] for r in rows}
    if judged and judged <= chunk_ids:
        return "chunk"
    return "document"


def against_eval(deployed: dict[str, float], expected: dict[str, float], tolerance_low_k: float,
                 tolerance_high_k: float) -> list[str]:
    """Metrics where the deployed search falls short of (or exceeds) eval's figure beyond the recipe's
    tolerance (``tolerance_low_k`` at k < 5, ``tolerance_high_k`` at k >= 5)."""
    out = []
    for metric, value in expected.items():
        if metric not in deployed or "@" not in metric:
            continue
        k = int(metric.split("@")[1])
        tol = tolerance_low_k if k < 5 else tolerance_high_k
        if abs(deployed[metric] - value) > tol + 1e-9:
            out.append(f"{metric}: deployed {deployed[metric]:.4f} vs eval {value:.4f} "
                       f"(|Δ| {abs(deployed[metric] - value):.4f} > {tol})")
    return out


def best_per_document(hits: Sequence[tuple[str, float]], keep: int = 100) -> dict[str, float]:
    """{doc id: its best chunk's score}, the ``keep`` best documents."""
    best: dict[str, float] = {}
    for doc, score in hits:
        if doc not in best or score > best[doc]:
            best[doc] = float(score)
    return dict(sorted(best.items(), key=lambda kv: -kv[1])[:keep])


def _exact_runs(modes: Sequence[str], texts: list[str], vectors: np.ndarray, rows: list[dict],
                chunk_doc: list[str], chunk_vec: np.ndarray, weight: float, chunk_k: int,
                stopwords: str | None) -> dict[str, list[dict[str, float]]]:
    out: dict[str, list[dict[str, float]]] = {}
    index = BM25Index([r["text"] for r in rows], stopwords) if {"bm25", "hybrid"} & set(modes) else None
    for mode in modes:
        if mode == "dense":
            scores, idx = dense_search(vectors, chunk_vec, chunk_k)
        elif mode == "bm25":
            scores, idx = index.search(texts, chunk_k)  # type: ignore[union-attr]
        else:
            scores, idx = hybrid_search(texts, vectors, chunk_vec, index, weight, chunk_k)  # type: ignore[arg-type]
        out[mode] = []
        for s_row, i_row in zip(scores, idx, strict=True):
            pairs = [(chunk_doc[i], float(s)) for s, i in zip(s_row, i_row, strict=True)
                     if mode != "bm25" or s > 0]  # BM25 does not retrieve a chunk sharing no term
            out[mode].append(best_per_document(pairs))
    return out


def evaluate_run_index(run_or_index: str, dataset_dir: str, split: str = "test", stopwords: str | None = "en",
                       out: str | None = None) -> dict[str, Any]:
    """`embedtune eval --index RUN --dataset DIR`: load, score, write ``deployed_eval.json`` beside the index."""
    from pathlib import Path

    from embedtune.artifacts import write_json
    from embedtune.retrieval.beir import load_beir
    from embedtune.retrieval.deployment import index_dir, open_searcher

    dataset = load_beir(dataset_dir, split)
    result = evaluate_index(open_searcher(run_or_index), dataset, stopwords=stopwords).to_json()
    result.update(dataset=str(dataset_dir), split=split)
    target = Path(out) if out else index_dir(run_or_index) / "deployed_eval.json"
    write_json(target, result)
    result["written_to"] = str(target)
    return result
