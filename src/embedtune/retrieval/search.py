"""Exact dense retrieval over L2-normalised embeddings in bounded memory."""

from __future__ import annotations

import numpy as np
import torch


def dense_search(
    queries: np.ndarray,
    corpus: np.ndarray,
    top_k: int = 100,
    query_block: int = 1024,
    corpus_block: int = 65536,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner-product search. Returns (scores, indices), each [n_queries, k], best first.

    Memory is bounded by one ``query_block × corpus_block`` score tile plus the running top-k
    (1024 × 65536 float32 = 256 MB), whatever the corpus size.
    """
    k = min(top_k, len(corpus))
    q_all = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    c_all = torch.from_numpy(np.ascontiguousarray(corpus, dtype=np.float32))
    out_scores = np.empty((len(queries), k), dtype=np.float32)
    out_idx = np.empty((len(queries), k), dtype=np.int64)
    for qs in range(0, len(queries), query_block):
        q = q_all[qs : qs + query_block]
        best_s = torch.full((len(q), k), -torch.inf)
        best_i = torch.zeros((len(q), k), dtype=torch.long)
        for cs in range(0, len(corpus), corpus_block):
            tile = q @ c_all[cs : cs + corpus_block].T
            s, i = torch.topk(tile, min(k, tile.shape[1]), dim=1)
            merged_s = torch.cat([best_s, s], dim=1)
            merged_i = torch.cat([best_i, i + cs], dim=1)
            best_s, pos = torch.topk(merged_s, k, dim=1)
            best_i = torch.gather(merged_i, 1, pos)
        out_scores[qs : qs + len(q)] = best_s.numpy()
        out_idx[qs : qs + len(q)] = best_i.numpy()
    return out_scores, out_idx


def to_run(
    query_ids: list[str],
    doc_ids: list[str],
    scores: np.ndarray,
    indices: np.ndarray,
    ignore_identical_ids: bool = False,
) -> dict[str, dict[str, float]]:
    """A TREC-style run {query id: {doc id: score}} from search results."""
    run: dict[str, dict[str, float]] = {}
    for qi, qid in enumerate(query_ids):
        hits = {}
        for s, di in zip(scores[qi], indices[qi], strict=True):
            did = doc_ids[di]
            if ignore_identical_ids and did == qid:
                continue
            hits[did] = float(s)
        run[qid] = hits
    return run


def faiss_search(queries: np.ndarray, corpus: np.ndarray, top_k: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """The same exact inner-product top-k through faiss ``IndexFlatIP`` (BLAS, multi-threaded): faster
    on large corpora, but holds the whole corpus matrix; results equal :func:`dense_search` up to ties."""
    import faiss

    corpus = np.ascontiguousarray(corpus, dtype=np.float32)
    index = faiss.IndexFlatIP(corpus.shape[1])
    index.add(corpus)
    scores, idx = index.search(np.ascontiguousarray(queries, dtype=np.float32), min(top_k, len(corpus)))
    return scores, idx.astype(np.int64)


def search(queries: np.ndarray, corpus: np.ndarray, top_k: int = 100,
           backend: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """Top-k by inner product with the chosen backend: ``exact`` (blocked torch) or ``faiss``."""
    if backend == "faiss":
        return faiss_search(queries, corpus, top_k)
    if backend != "exact":
        raise ValueError(f"unknown search backend {backend!r}: use 'exact' or 'faiss'")
    return dense_search(queries, corpus, top_k)
