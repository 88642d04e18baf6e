"""Eval core: BEIR loading, blocked dense search and metrics checked against values computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from embedtune.artifacts import ArtifactError
from embedtune.evaluate import compute_metrics, dense_search, load_beir


def _write_beir(root, corpus, queries, qrels_rows, split="test"):
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    body = "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t{s}\n" for q, d, s in qrels_rows)
    (root / "qrels" / f"{split}.tsv").write_text(body)
    return root


def test_metrics_match_hand_computed_values():
    qrels = {"q1": {"d1": 1, "d3": 1}, "q2": {"d2": 1}}
    run = {"q1": {"d1": 0.9, "d2": 0.8, "d3": 0.7}, "q2": {"d1": 0.9, "d3": 0.8, "d4": 0.1}}
    m = compute_metrics(qrels, run, k_values=(1, 3))
    # q1: relevant at ranks 1 and 3. DCG@3 = 1 + 1/log2(4) = 1.5; IDCG@3 = 1 + 1/log2(3).
    ndcg_q1 = 1.5 / (1 + 1 / math.log2(3))
    assert m["ndcg@3"] == pytest.approx(ndcg_q1 / 2)  # q2 retrieves nothing relevant
    assert m["ndcg@1"] == pytest.approx(0.5)
    assert m["recall@1"] == pytest.approx((0.5 + 0) / 2)
    assert m["recall@3"] == pytest.approx((1.0 + 0) / 2)
    assert m["precision@3"] == pytest.approx((2 / 3 + 0) / 2)
    assert m["map@3"] == pytest.approx(((1 + 2 / 3) / 2 + 0) / 2)
    assert m["mrr@10"] == pytest.approx(0.5)


def test_query_missing_from_run_counts_as_zero():
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 1}}
    m = compute_metrics(qrels, {"q1": {"d1": 1.0}}, k_values=(1,))
    assert m["ndcg@1"] == pytest.approx(0.5)


def test_blocked_search_equals_full_sort():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(37, 8)).astype(np.float32)
    c = rng.normal(size=(501, 8)).astype(np.float32)
    scores, idx = dense_search(q, c, top_k=10, query_block=8, corpus_block=64)
    full = q @ c.T
    expected = np.argsort(-full, axis=1)[:, :10]
    np.testing.assert_array_equal(idx, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(full, expected, 1), rtol=1e-5)


def test_load_beir_reports_dangling_qrels(tmp_path):
    root = _write_beir(tmp_path / "ds", [{"_id": "d1", "title": "T", "text": "x"}],
                       [{"_id": "q1", "text": "a"}, {"_id": "q2", "text": "b"}],
                       [("q1", "d1", 1), ("q2", "missing", 1)])
    ds = load_beir(root)
    assert ds.qrels == {"q1": {"d1": 1}}
    assert list(ds.queries) == ["q1"]
    assert any("missing" in w for w in ds.warnings)
    assert ds.passages(["d1"]) == ["T x"]


def test_load_beir_malformed_line_names_file_and_line(tmp_path):
    root = _write_beir(tmp_path / "ds", [{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "a"}],
                       [("q1", "d1", 1)])
    with (root / "corpus.jsonl").open("a") as fh:
        fh.write("{not json\n")
    with pytest.raises(ArtifactError, match=r"corpus.jsonl:2"):
        load_beir(root)


def test_cross_lingual_queries_from_another_folder(tmp_path):
    zh = _write_beir(tmp_path / "zh", [{"_id": "p0", "text": "猫"}], [{"_id": "q0", "text": "猫?"}],
                     [("q0", "p0", 1)])
    de = _write_beir(tmp_path / "de", [{"_id": "p0", "text": "Katze"}], [{"_id": "q0", "text": "Katze?"}],
                     [("q0", "p0", 1)])
    ds = load_beir(zh, queries_folder=de)
    assert ds.queries == {"q0": "Katze?"} and ds.corpus["p0"]["text"] == "猫"
    assert ds.name == "de->zh"


def test_ranking_spec_travels_the_eval_settings_and_retrieves_one_extra_hit_for_the_query_itself():
    from embedtune.config import EvalConfig
    from embedtune.retrieval.metrics import RankingSpec

    spec = RankingSpec.of(EvalConfig(k_values=[1, 10], top_k=5, ignore_identical_ids=True))
    assert spec == RankingSpec((1, 10), 5, True)
    assert spec.depth == 11 and RankingSpec((1, 10), 5).depth == 10
    assert spec.cut_at(3) == RankingSpec((3,), 5, True)
    with pytest.raises(ValueError, match="k_values"):
        RankingSpec((0,))
