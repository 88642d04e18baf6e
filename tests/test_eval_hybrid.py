"""Hybrid retrieval (dense + BM25 fusion) in the eval stage: exact fused ranking, and that it recovers
what each half misses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from embedtune.evaluate import RankingSpec, evaluate_embeddings, load_beir
from embedtune.evaluate.hybrid import evaluate_hybrid
from embedtune.retrieval.bm25 import BM25Index
from embedtune.retrieval.fusion import fuse, hybrid_search
from test_eval_core import _write_beir

DOCS = ["the kinase phosphorylates tau protein", "tau tangles in alzheimer brains", "mice sleep more in winter",
        "winter flu season peaks", "protein folding by chaperones", "ocean currents carry heat",
        "solar panels convert light", "gene expression in yeast cells"]
QUERIES = ["tau kinase", "flu in winter", "yeast gene", "heat transport oceans"]


def _zfusion_order(dense: np.ndarray, lexical: np.ndarray, w: float) -> np.ndarray:
    """The reference: rank by (1 - w) z(dense) + w z(bm25), every document, full sort."""
    z = lambda x: (x - x.mean(1, keepdims=True)) / x.std(1, ddof=1, keepdims=True)  # noqa: E731
    return np.argsort(-((1 - w) * z(dense) + w * z(lexical)), axis=1, kind="stable")


def test_hybrid_search_ranks_like_a_full_sort_of_the_z_score_fusion():
    rng = np.random.default_rng(0)
    docs = rng.normal(size=(len(DOCS), 16)).astype(np.float32)
    docs /= np.linalg.norm(docs, axis=1, keepdims=True)
    queries = rng.normal(size=(len(QUERIES), 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = BM25Index(DOCS)
    for w in (0.3, 0.7):
        scores, idx = hybrid_search(QUERIES, queries, docs, index, w, top_k=5, query_block=3)  # 2 blocks
        expected = _zfusion_order(queries @ docs.T, index.scores(QUERIES), w)[:, :5]
        np.testing.assert_array_equal(idx, expected)
        assert np.all(np.diff(scores, axis=1) <= 0)


def test_fusion_stays_in_dense_units_and_ignores_a_query_without_lexical_match():
    dense = torch.tensor([[0.9, 0.5, 0.1], [0.4, 0.3, 0.2]])
    lexical = torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    fused = fuse(dense, lexical, 0.5)
    assert torch.allclose(fused[1], dense[1])  # nothing to learn from a constant BM25 row
    assert fused[0].mean() == pytest.approx(dense[0].mean().item(), abs=1e-6)  # same centre as the cosines
    assert fused[0, 1] > fused[0, 0]  # the lexical match overtakes the dense favourite


def test_fusion_recovers_a_document_that_only_shares_a_rare_term(tmp_path):
    """Dense embeddings that point every query at the wrong document; BM25 alone finds the right one
    for two of three queries. The fusion must beat the dense model, which is the point of the row."""
    docs = [{"_id": f"d{i}", "text": t} for i, t in enumerate(DOCS[:3])]
    queries = [{"_id": "q0", "text": "kinase"}, {"_id": "q1", "text": "alzheimer"}, {"_id": "q2", "text": "rodents"}]
    root = _write_beir(tmp_path / "ds", docs, queries, [("q0", "d0", 1), ("q1", "d1", 1), ("q2", "d2", 1)])
    data = load_beir(root)
    qids, dids = list(data.queries), list(data.corpus)
    d_emb = np.eye(3, dtype=np.float32)
    q_emb = np.array([[0.1, 0.99, 0], [0.99, 0.1, 0], [0.1, 0, 0.99]], dtype=np.float32)  # q2 right, q0/q1 swapped
    q_emb /= np.linalg.norm(q_emb, axis=1, keepdims=True)
    dense = evaluate_embeddings(data, qids, q_emb, dids, d_emb, RankingSpec((1,)))
    fused = evaluate_hybrid(data, qids, q_emb, dids, d_emb, BM25Index(data.passages(dids)), 0.5, RankingSpec((1,)))
    assert dense["ndcg@1"] == pytest.approx(1 / 3)
    assert fused["ndcg@1"] == pytest.approx(1.0)


def test_hybrid_search_rejects_misaligned_inputs():
    index = BM25Index(DOCS)
    with pytest.raises(ValueError, match="differ in length"):
        hybrid_search(QUERIES, np.zeros((2, 4), np.float32), np.zeros((len(DOCS), 4), np.float32), index, 0.5)
