"""Eval stage, embedding cache, Matryoshka sweep, BM25, reports and the `embedtune eval` command."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from embedtune.artifacts import RunDir, read_json
from embedtune.config import EvalConfig, ModelConfig, Recipe
from embedtune.evaluate import (
    EmbeddingCache,
    LocalEncoder,
    RankingSpec,
    compare_within_tolerance,
    evaluate_bm25,
    evaluate_embeddings,
    evaluate_model,
    load_beir,
    model_fingerprint,
    run_eval,
)
from embedtune.models import load_model
from embedtune.retrieval.beir import BeirDataset
from test_eval_core import _write_beir

# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def finetuned_dir(tiny_bert_dir, tmp_path_factory):
    """The tiny model with perturbed weights: a stand-in for a fine-tuned copy of the base."""
    import torch

    model = load_model(str(tiny_bert_dir))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5 * (p.std() if p.numel() > 1 else 0.1))
    out = tmp_path_factory.mktemp("tiny-ft")
    model.save(str(out))
    return out


def _topical_beir(root, docs):
    """Each document gets one query made of three of its own words (retrievable, not trivially)."""
    queries = [{"_id": f"q-{d['_id']}", "text": " ".join(d["text"].split()[1:4])} for d in docs]
    return _write_beir(root, docs, queries, [(f"q-{d['_id']}", d["_id"], 1) for d in docs])


@pytest.fixture
def run_with_finetune(tmp_path, topical_docs, finetuned_dir):
    """A run dir with prep/eval (BEIR) and a completed finetune stage that trained dims 32/16/8."""
    run = RunDir(tmp_path / "run")
    _topical_beir(run.path("prep", "eval"), topical_docs)
    run.stage("prep", {}).finish(outputs=[run.path("prep", "eval")])
    shutil.copytree(finetuned_dir, run.path("finetune", "model"))
    run.stage("finetune", {"finetune": {"matryoshka_dims": [32, 16, 8]}}).finish(
        outputs=[run.path("finetune", "model")])
    return run


# ------------------------------------------------------------------------------------------ stage


def test_stage_compares_base_and_finetuned_and_writes_reports(run_with_finetune, tiny_bert_dir, finetuned_dir):
    run = run_with_finetune
    recipe = Recipe(model=ModelConfig(name=str(tiny_bert_dir)))
    manifest = run_eval(recipe, run)

    results = read_json(run.path("eval", "results.json"))
    assert results["models"] == ["base", "finetuned"]
    assert (results["n_queries"], results["n_docs"]) == (24, 24)
    data = load_beir(run.path("prep", "eval"))
    base = evaluate_model(load_model(str(tiny_bert_dir)), data)
    tuned = evaluate_model(load_model(str(finetuned_dir)), data)
    assert results["base"]["ndcg@10"] == pytest.approx(base["ndcg@10"], abs=1e-6)
    assert results["finetuned"]["ndcg@10"] == pytest.approx(tuned["ndcg@10"], abs=1e-6)
    assert results["base"]["map@100"] != results["finetuned"]["map@100"]  # really two different models
    assert results["bm25"]["ndcg@10"] == pytest.approx(evaluate_bm25(data)["ndcg@10"])
    # The sweep follows the dims the fine-tune recorded in its manifest.
    assert results["matryoshka"]["dims"] == [32, 16, 8]
    assert results["matryoshka"]["finetuned"]["32"]["ndcg@10"] == results["finetuned"]["ndcg@10"]

    report = run.path("eval", "report.md").read_text()
    b, f = results["base"]["ndcg@10"], results["finetuned"]["ndcg@10"]
    hb, hf = results["hybrid"]["base"]["ndcg@10"], results["hybrid"]["finetuned"]["ndcg@10"]
    assert (f"| nDCG@10 | {results['bm25']['ndcg@10']:.4f} | {b:.4f} | {f:.4f} | {hb:.4f} | {hf:.4f} "
            f"| {f - b:+.4f} |") in report
    assert "| 16 |" in report  # Matryoshka table row
    png = run.path("eval", "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert manifest.metrics["finetuned_ndcg@10"] == f
    assert manifest.counts == {**manifest.counts, "queries": 24, "encoded": 4, "cache_hits": 0}


def test_stage_fuses_each_model_with_bm25_at_the_configured_weight(run_with_finetune, tiny_bert_dir):
    from embedtune.evaluate.hybrid import evaluate_hybrid
    from embedtune.retrieval.bm25 import BM25Index

    run = run_with_finetune
    recipe = Recipe(model=ModelConfig(name=str(tiny_bert_dir)), eval=EvalConfig(hybrid_bm25_weight=0.4))
    manifest = run_eval(recipe, run)
    results = read_json(run.path("eval", "results.json"))
    assert results["hybrid"]["bm25_weight"] == 0.4 and set(results["hybrid"]) == {"bm25_weight", "base", "finetuned"}

    data = load_beir(run.path("prep", "eval"))
    qids, dids = list(data.queries), list(data.corpus)
    model = load_model(str(tiny_bert_dir))
    q = model.encode([data.queries[i] for i in qids], normalize_embeddings=True)
    d = model.encode(data.passages(dids), normalize_embeddings=True)
    expected = evaluate_hybrid(data, qids, q, dids, d, BM25Index(data.passages(dids)), 0.4)
    assert results["hybrid"]["base"]["ndcg@10"] == pytest.approx(expected["ndcg@10"], abs=1e-4)
    assert manifest.metrics["base_hybrid_ndcg@10"] == results["hybrid"]["base"]["ndcg@10"]
    report = run.path("eval", "report.md").read_text()
    assert "base + BM25" in report and "fine-tuned + BM25" in report and "BM25 weight 0.4" in report

    off = Recipe(model=ModelConfig(name=str(tiny_bert_dir)), eval=EvalConfig(hybrid_bm25_weight=0))
    run_eval(off, run, force=True)
    assert read_json(run.path("eval", "results.json"))["hybrid"] is None


def test_rerun_is_skipped_and_forced_rerun_encodes_nothing(run_with_finetune, tiny_bert_dir, monkeypatch):
    run = run_with_finetune
    recipe = Recipe(model=ModelConfig(name=str(tiny_bert_dir)))
    first = run_eval(recipe, run)
    assert run_eval(recipe, run).skipped

    def no_encoding(self, texts, kind):
        raise AssertionError(f"{self.label} encoded {len(texts)} {kind}s again")

    monkeypatch.setattr(LocalEncoder, "encode", no_encoding)
    again = run_eval(recipe, run, force=True)
    assert (again.counts["cache_hits"], again.counts["encoded"]) == (4, 0)
    assert again.metrics == first.metrics
    assert read_json(run.path("eval", "results.json"))["base"]["docs_per_second"] is None  # no fake speed
    assert "from cache" in run.path("eval", "report.md").read_text()


def test_stage_without_finetune_evaluates_base_only(tmp_path, topical_docs, tiny_bert_dir):
    run = RunDir(tmp_path / "run")
    _topical_beir(run.path("prep", "eval"), topical_docs)
    run.stage("prep", {}).finish()
    recipe = Recipe(model=ModelConfig(name=str(tiny_bert_dir)), eval=EvalConfig(bm25=False))
    run_eval(recipe, run)
    results = read_json(run.path("eval", "results.json"))
    assert results["models"] == ["base"] and results.get("finetuned") is None and results["bm25"] is None
    assert "| nDCG@10 | " in run.path("eval", "report.md").read_text()


def test_stage_needs_prep_or_a_dataset(tmp_path, tiny_bert_dir):
    from embedtune.artifacts import ArtifactError

    with pytest.raises(ArtifactError, match="prep"):
        run_eval(Recipe(model=ModelConfig(name=str(tiny_bert_dir))), RunDir(tmp_path / "run"))


# ------------------------------------------------------------------------------------------ cache


def test_model_fingerprint_follows_weights_not_location(tiny_bert_dir, finetuned_dir, tmp_path):
    copy = shutil.copytree(tiny_bert_dir, tmp_path / "copy")
    assert model_fingerprint(copy) == model_fingerprint(tiny_bert_dir)
    assert model_fingerprint(finetuned_dir) != model_fingerprint(tiny_bert_dir)
    assert model_fingerprint("org/some-model") == "hub:org/some-model"


def test_cache_key_changes_with_prompt_and_texts(tiny_bert_dir, tmp_path):
    model = load_model(str(tiny_bert_dir))
    enc = LocalEncoder(model, model_fingerprint(tiny_bert_dir))
    cache = EmbeddingCache(tmp_path)
    from embedtune.retrieval.cache import encode_cached

    a = encode_cached(enc, ["alpha beta", "gamma"], "passage", cache)
    b = encode_cached(enc, ["alpha beta", "gamma"], "passage", cache)
    np.testing.assert_array_equal(a, b)
    assert (enc.calls, cache.hits) == (1, 1)
    encode_cached(enc, ["alpha", "beta gamma"], "passage", cache)  # same characters, other texts
    model.prompts = {**model.prompts, "document": "passage: "}
    encode_cached(enc, ["alpha beta", "gamma"], "passage", cache)
    assert (enc.calls, cache.hits) == (3, 1)


# ------------------------------------------------------------------------------------------ metrics


def test_matryoshka_truncation_renormalises():
    # q = e1. d1's first two dims are (0.6, 0) and d2's (0.7, 0.7): at full dim d2 scores higher (0.7 vs
    # 0.6); truncated to 2 dims and re-normalised, d1 becomes (1, 0) and wins (1.0 vs 0.707).
    # Without re-normalising, d2 would still win: so nDCG@1 of relevant d1 is 0 at full, 1 at 2 dims.
    data = BeirDataset(corpus={"d1": {"text": ""}, "d2": {"text": ""}}, queries={"q": ""},
                       qrels={"q": {"d1": 1}})
    q = np.array([[1, 0, 0, 0]], dtype=np.float32)
    d = np.array([[0.6, 0, 0.8, 0], [0.7, 0.7, 0.141, 0]], dtype=np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    full = evaluate_embeddings(data, ["q"], q, ["d1", "d2"], d, RankingSpec((1,)))
    two = evaluate_embeddings(data, ["q"], q, ["d1", "d2"], d, RankingSpec((1,)), dimensions=2)
    assert (full["ndcg@1"], two["ndcg@1"]) == (0.0, 1.0)


def test_ignore_identical_ids_drops_the_query_itself():
    data = BeirDataset(corpus={"a": {"text": ""}, "b": {"text": ""}}, queries={"a": ""}, qrels={"a": {"b": 1}})
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    d = np.array([[1.0, 0.0], [0.8, 0.6]], dtype=np.float32)
    assert evaluate_embeddings(data, ["a"], q, ["a", "b"], d, RankingSpec((1,)))["ndcg@1"] == 0.0
    assert evaluate_embeddings(data, ["a"], q, ["a", "b"], d,
                               RankingSpec((1,), top_k=1, ignore_identical_ids=True))["ndcg@1"] == 1.0


def test_faiss_backend_gives_the_same_metrics(tiny_bert_dir, tmp_path, topical_docs):
    data = load_beir(_topical_beir(tmp_path / "ds", topical_docs))
    rng = np.random.default_rng(0)
    q = rng.normal(size=(len(data.queries), 16)).astype(np.float32)
    d = rng.normal(size=(len(data.corpus), 16)).astype(np.float32)
    args = (data, list(data.queries), q, list(data.corpus), d)
    assert evaluate_embeddings(*args, backend="faiss") == pytest.approx(evaluate_embeddings(*args))


def test_bm25_hand_computed(tmp_path):
    root = _write_beir(tmp_path / "ds", [{"_id": "d1", "text": "red apples grow"},
                                         {"_id": "d2", "text": "blue oceans roar"},
                                         {"_id": "d3", "text": "green forests sleep"}],
                       [{"_id": "q1", "text": "apples"}, {"_id": "q2", "text": "oceans"},
                        {"_id": "q3", "text": "nothing matches"}],
                       [("q1", "d1", 1), ("q2", "d2", 1), ("q3", "d3", 1)])
    m = evaluate_bm25(load_beir(root), RankingSpec((1, 3)))
    # q1 and q2 find their document first; q3 shares no term with any document and retrieves nothing.
    assert m["ndcg@1"] == pytest.approx(2 / 3) and m["recall@3"] == pytest.approx(2 / 3)
    assert m["precision@3"] == pytest.approx((1 / 3 + 1 / 3 + 0) / 3)


def test_tolerance_is_looser_below_k5():
    ref = {"ndcg@1": 0.50, "recall@1": 0.50, "ndcg@10": 0.60, "map@100": 0.40, "mrr@10": 0.5}
    got = {"ndcg@1": 0.52, "recall@1": 0.46, "ndcg@10": 0.611, "map@100": 0.395, "mrr@10": 0.5}
    violations = compare_within_tolerance(ref, got, low=0.03, high=0.01)
    assert [(v.metric, v.tolerance) for v in violations] == [("recall@1", 0.03), ("ndcg@10", 0.01)]
    assert violations[1].diff == pytest.approx(0.011)


# ------------------------------------------------------------------------------------------ CLI


def _cli(*args):
    from embedtune.cli import app

    return CliRunner().invoke(app, ["eval", *map(str, args)], catch_exceptions=False)


def test_cli_standalone_cross_lingual_two_models(tmp_path, tiny_bert_dir, finetuned_dir, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    corpus = [{"_id": f"p{i}", "text": f"paragraph {w}"} for i, w in enumerate(["eins", "zwei", "drei"])]
    zh = _write_beir(tmp_path / "zh", corpus, [{"_id": "q0", "text": "zh question"}], [("q0", "p1", 1)])
    de = _write_beir(tmp_path / "de", corpus, [{"_id": "q0", "text": "Frage zwei"}], [("q0", "p1", 1)])
    out = tmp_path / "out"
    res = _cli("--dataset", zh, "--queries", de, "--model", tiny_bert_dir, "--model", finetuned_dir,
               "--out", out, "--dims", "16,8")
    assert res.exit_code == 0, res.output
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "de->zh" and results["n_queries"] == 1
    assert results["models"] == [tiny_bert_dir.name, finetuned_dir.name]
    assert results["matryoshka"]["dims"] == [32, 16, 8]
    assert (out / "report.png").is_file() and "Δ" in (out / "report.md").read_text()
    assert any(p.suffix == ".npy" for p in (tmp_path / "cache").iterdir())


def test_cli_in_a_run_runs_the_stage(run_with_finetune, tiny_bert_dir, finetuned_dir):
    run = run_with_finetune
    res = _cli("-r", run.root, "-o", f"model.name={tiny_bert_dir}", "--no-bm25")
    assert res.exit_code == 0, res.output
    manifest = run.manifest("eval")
    results = read_json(run.path("eval", "results.json"))
    assert results["bm25"] is None and "bm25_ndcg@10" not in manifest.metrics
    # The manifest records what was evaluated: the run's held-out set, both models' figures re-derived here.
    assert manifest.stage == "eval" and manifest.config["model"]["name"] == str(tiny_bert_dir)
    assert (manifest.counts["queries"], manifest.counts["documents"]) == (24, 24)
    data = load_beir(run.path("prep", "eval"))
    assert manifest.metrics["base_ndcg@10"] == pytest.approx(
        evaluate_model(load_model(str(tiny_bert_dir)), data)["ndcg@10"], abs=1e-6)
    assert manifest.metrics["finetuned_ndcg@10"] == pytest.approx(
        evaluate_model(load_model(str(finetuned_dir)), data)["ndcg@10"], abs=1e-6)
    assert set(manifest.outputs) >= {f"eval/{name}" for name in ("results.json", "report.md")}


def test_cli_reports_a_malformed_dataset(tmp_path, tiny_bert_dir):
    root = _write_beir(tmp_path / "ds", [{"_id": "d1", "text": "x"}], [{"_id": "q1", "text": "a"}],
                       [("q1", "d1", 1)])
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "a"}\n{"_id": "q2"}\n')
    res = _cli("--dataset", root, "--model", tiny_bert_dir)
    assert res.exit_code == 1 and "queries.jsonl:2" in res.output and "text" in res.output


def test_cli_error_keeps_a_long_path_and_its_line_number_on_one_line(tmp_path, tiny_bert_dir):
    """The file:line of a bad row must survive a narrow terminal intact (copyable, greppable)."""
    root = _write_beir(tmp_path / ("deep_folder_" * 6) / "ds", [{"_id": "d1", "text": "x"}],
                       [{"_id": "q1", "text": "a"}], [("q1", "d1", 1)])
    (root / "queries.jsonl").write_text('{"_id": "q1", "text": "a"}\n{"_id": "q2"}\n')
    res = _cli("--dataset", root, "--model", tiny_bert_dir)
    assert res.exit_code == 1
    assert f"{root / 'queries.jsonl'}:2: missing field(s) text" in res.output


# ------------------------------------------------------------------------------ real queries decide


def _real_dataset(root, docs):
    """The user's labelled queries: other words of each document than the synthetic set's."""
    queries = [{"_id": f"real-{d['_id']}", "text": " ".join(d["text"].split()[4:8])} for d in docs]
    return _write_beir(root, docs, queries, [(f"real-{d['_id']}", d["_id"], 1) for d in docs])


def test_real_queries_are_scored_beside_the_synthetic_ones_and_decide(run_with_finetune, tiny_bert_dir,
                                                                       topical_docs, tmp_path):
    run = run_with_finetune
    real = tmp_path / "real"
    _real_dataset(real, topical_docs)
    shown = " ".join(topical_docs[0]["text"].split()[4:8])  # a real query the user also gave as an example
    examples = tmp_path / "examples.jsonl"
    examples.write_text(json.dumps({"query": shown.upper() + " !", "passage": topical_docs[0]["text"]}) + "\n")
    recipe = Recipe.model_validate({"model": {"name": str(tiny_bert_dir)}, "sdg": {"examples": str(examples)},
                                    "eval": {"dataset": str(real), "hybrid_weight_grid": [0.1, 0.6]}})
    manifest = run_eval(recipe, run)
    results = read_json(run.path("eval", "results.json"))
    # The real set decides; the example query (matched whatever its case and punctuation) is left out.
    assert results["decided_on"] == "your real queries"
    assert results["excluded_examples"] == [f"real-{topical_docs[0]['_id']}"]
    assert results["n_queries"] == len(topical_docs) - 1 == manifest.counts["queries"]
    assert manifest.counts["excluded_examples"] == 1
    # The synthetic held-out set is scored beside it and chose the BM25 weight the real set's rows use.
    synthetic = results["synthetic"]
    assert synthetic["n_queries"] == 24 and synthetic["per_query"]["ndcg@10"]["finetuned"]
    assert results["hybrid"]["bm25_weight"] == synthetic["hybrid_weight"]["chosen"] in (0.1, 0.6)
    # Per-query scores of every retrieval, aligned on the query ids, averaging to the reported means.
    per = results["per_query"]
    assert len(per["query_ids"]) == results["n_queries"] and f"real-{topical_docs[0]['_id']}" not in per["query_ids"]
    for key, mean in (("base", results["base"]["ndcg@10"]), ("finetuned_hybrid",
                                                               results["hybrid"]["finetuned"]["ndcg@10"]),
                      ("bm25", results["bm25"]["ndcg@10"]), ("finetuned@16",
                                                              results["matryoshka"]["finetuned"]["16"]["ndcg@10"])):
        assert np.mean(per["ndcg@10"][key]) == pytest.approx(mean, abs=1e-5)
    assert np.mean(per["recall@10"]["finetuned"]) == pytest.approx(results["finetuned"]["recall@10"], abs=1e-5)
    # Paired intervals against the base model, and the release gate's line, in the results and the report.
    d = results["paired"]["retrievals"]["finetuned"]
    assert d["low"] <= d["mean"] <= d["high"] and d["n"] == results["n_queries"]
    report = run.path("eval", "report.md").read_text()
    assert "1 queries were left out" in report and "95 % paired interval" in report
    assert f"**Release gate** (on {results['n_queries']} your real queries): {results['release']['line']}" in report
    assert "Synthetic held-out queries (24" in report


def test_without_a_heldout_set_only_the_real_queries_are_scored(tmp_path, tiny_bert_dir, topical_docs):
    real = tmp_path / "real"
    _real_dataset(real, topical_docs)
    recipe = Recipe.model_validate({"model": {"name": str(tiny_bert_dir)}, "eval": {"dataset": str(real)}})
    run_eval(recipe, RunDir(tmp_path / "run"))
    results = read_json(tmp_path / "run" / "eval" / "results.json")
    assert "synthetic" not in results and results["n_queries"] == len(topical_docs)
    assert results["release"]["deployed"] in ("base", "base_hybrid")  # nothing else competed
