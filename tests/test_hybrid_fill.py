"""Hybrid search on a real Milvus Lite collection larger than the dense candidate window: a chunk that only BM25
finds (far outside the dense top 100) is fused with its exact dense score, so the top-k is the exact fusion's."""

from __future__ import annotations

import numpy as np
import pytest

from embedtune.retrieval import milvus

DIM = 16
RARE = "zyxqvw"  # in two chunks only: BM25 finds them, dense search ranks them last
FILLERS = 130  # more than SearchSettings.candidates (100)
WORDS = ["stars", "planets", "ovens", "flour", "bonds", "markets", "boats", "sails", "kernels", "threads"]


def _vector(rng: np.random.Generator, score: float) -> np.ndarray:
    """A unit vector whose inner product with the query (e0) is exactly ``score``."""
    rest = rng.normal(size=DIM - 1)
    rest *= np.sqrt(1 - score**2) / np.linalg.norm(rest)
    return np.concatenate([[score], rest]).astype(np.float32)


@pytest.fixture
def collection(tmp_path):
    rng = np.random.default_rng(0)
    dense = {f"f{i:03d}": float(s) for i, s in enumerate(rng.uniform(0.2, 0.9, FILLERS))}
    dense |= {"rare-a": 0.15, "rare-b": 0.05}  # below every filler; same text, so the same BM25 score
    vectors = {cid: _vector(rng, s) for cid, s in dense.items()}
    texts = {cid: " ".join(rng.choice(WORDS, 8)) for cid in dense} | {
        "rare-a": f"the {RARE} protocol", "rare-b": f"the {RARE} protocol"}
    uri = str(tmp_path / "milvus.db")
    client = milvus.connect(uri)
    milvus.create_collection(client, "chunks", DIM, milvus.analyzer_params(None))
    client.insert("chunks", [{"id": cid, "doc_id": cid, "title": "", "source": "", "text": texts[cid],
                              "dense": vectors[cid].tolist()} for cid in dense])
    acc = milvus.StatsAccumulator(DIM)
    acc.add(np.stack(list(vectors.values())))
    yield client, dense, acc.result()
    milvus.release(client, uri)


def _exact_fusion(dense: dict[str, float], bm25: dict[str, float], weight: float) -> dict[str, float]:
    """Every chunk scored both ways, z-scored over the whole corpus (population statistics), mixed."""
    ids = list(dense)
    d = np.array([dense[c] for c in ids])
    b = np.array([bm25.get(c, 0.0) for c in ids])
    fused = (1 - weight) * d + weight * (d.mean() + d.std() * (b - b.mean()) / b.std())
    return dict(zip(ids, fused.tolist(), strict=True))


def test_a_bm25_only_hit_outside_the_dense_window_ranks_by_its_exact_dense_score(collection):
    client, dense, stats = collection
    query = np.eye(DIM, dtype=np.float32)[:1]
    settings = milvus.SearchSettings(bm25_weight=0.5)
    searcher = milvus.MilvusSearcher(client, "chunks", lambda texts: np.repeat(query, len(texts), 0), DIM,
                                     settings, stats)
    window = {h.id for h in searcher.search([RARE], mode="dense", top_k=settings.candidates)[0]}
    assert len(window) == settings.candidates and not window & {"rare-a", "rare-b"}  # only the fill scores them
    bm25 = {h.id: h.score for h in searcher.search([RARE], mode="bm25", top_k=10)[0]}
    assert set(bm25) == {"rare-a", "rare-b"} and bm25["rare-a"] == pytest.approx(bm25["rare-b"])

    hits = searcher.search([RARE], mode="hybrid", top_k=5, with_text=False)[0]
    exact = sorted(_exact_fusion(dense, bm25, settings.bm25_weight).items(), key=lambda kv: -kv[1])[:5]
    assert [h.id for h in hits] == [cid for cid, _ in exact]
    assert [h.id for h in hits[:2]] == ["rare-a", "rare-b"]  # equal BM25: the higher true dense score first
    assert [h.score for h in hits] == pytest.approx([s for _, s in exact], abs=1e-5)
