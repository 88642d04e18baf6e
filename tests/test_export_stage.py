"""The export stage: which model it exports, parity.json, failure handling, resume; and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from embedtune.artifacts import RunDir, write_jsonl, write_text
from embedtune.config import Recipe
from embedtune.export import ParityError, run_export
from embedtune.export import parity as parity_mod


def _recipe(model_dir: Path, **export: object) -> Recipe:
    return Recipe.model_validate({"model": {"name": str(model_dir)},
                                  "export": {"gpu_precisions": [], **export}, "eval": {"k_values": [1, 5]}})


def _fake_finetune(run: RunDir, model_dir: Path) -> Path:
    folder = run.path("finetune", "model")
    shutil.copytree(model_dir, folder)
    st = run.stage("finetune", {"test": True})
    st.up_to_date()
    st.finish(outputs=[folder])
    return folder


def _fake_eval_set(run: RunDir, docs: list[dict[str, str]]) -> None:
    """A small BEIR folder under prep/eval: one query per document, its title words as the query."""
    folder = run.path("prep", "eval")
    write_jsonl(folder / "corpus.jsonl", docs)
    write_jsonl(folder / "queries.jsonl", [{"_id": f"q{i}", "text": d["text"].split(".")[0]}
                                           for i, d in enumerate(docs)])
    write_text(folder / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n" +
               "".join(f"q{i}\t{d['_id']}\t1\n" for i, d in enumerate(docs)))
    st = run.stage("prep", {"test": True})
    st.up_to_date()
    st.finish(outputs=[folder])


def test_without_finetune_the_base_model_is_exported_and_cosine_checked(tiny_bert_dir, tmp_path):
    run = RunDir(tmp_path / "run")
    manifest = run_export(_recipe(tiny_bert_dir), run)
    out = run.path("export")
    meta = json.loads((out / "embedtune.json").read_text())
    assert meta["source"] == str(tiny_bert_dir)
    report = json.loads((out / "parity.json").read_text())
    assert report["passed"] and report["fp32_vs_torch"]["min_cosine"] >= 0.9999
    assert set(report["fp32_vs_torch"]["checks"]) == {"query@32", "document@32", "query@16", "document@16"}
    assert report["int8_vs_fp32"]["retrieval"] is None and "no eval set" in report["int8_vs_fp32"]["note"]
    assert manifest.metrics["fp32_min_cosine"] >= 0.9999
    assert str(out / "model.int8.onnx") in manifest.outputs
    again = run_export(_recipe(tiny_bert_dir), run)
    assert again.skipped  # unchanged inputs and config: resumed, not redone


def test_finetuned_model_is_preferred_and_int8_checked_on_the_eval_set(tiny_bert_dir, tmp_path, topical_docs):
    run = RunDir(tmp_path / "run")
    finetuned = _fake_finetune(run, tiny_bert_dir)
    _fake_eval_set(run, topical_docs)
    recipe = _recipe(tiny_bert_dir, tolerance_low_k=1.0, tolerance_high_k=1.0)  # random model: check the wiring
    run_export(recipe, run)
    assert json.loads(run.path("export", "embedtune.json").read_text())["source"] == str(finetuned)
    retrieval = json.loads(run.path("export", "parity.json").read_text())["int8_vs_fp32"]["retrieval"]
    assert retrieval["queries"] == len(topical_docs) and retrieval["documents"] == len(topical_docs)
    assert set(retrieval["delta"]) == {"ndcg@1", "recall@1", "ndcg@5", "recall@5"}
    for key, delta in retrieval["delta"].items():
        assert delta == pytest.approx(retrieval["int8"][key] - retrieval["fp32"][key], abs=1e-4)


def test_parity_failure_fails_the_stage_unless_allowed(tiny_bert_dir, tmp_path, monkeypatch):
    real = parity_mod.onnx_vs_torch

    def unreachable_threshold(model, encoder, probe, min_cosine, dims):  # a graph that drifted, in effect
        return real(model, encoder, probe, 1.01, dims)

    monkeypatch.setattr(parity_mod, "onnx_vs_torch", unreachable_threshold)
    run = RunDir(tmp_path / "run")
    with pytest.raises(ParityError, match="min cosine"):
        run_export(_recipe(tiny_bert_dir, int8=False), run)
    assert run.manifest("export") is None  # not marked done
    assert json.loads(run.path("export", "parity.json").read_text())["passed"] is False
    manifest = run_export(_recipe(tiny_bert_dir, int8=False, allow_parity_failure=True), run)
    assert manifest.counts["parity"].startswith("FAILED")


def test_cli_exports_a_model_folder_standalone(tiny_bert_dir, tmp_path):
    from typer.testing import CliRunner

    from embedtune.cli import app

    out = tmp_path / "onnx"
    result = CliRunner().invoke(app, ["export", "--model", str(tiny_bert_dir), "--out", str(out),
                                      "-o", "export.int8=false", "-o", "export.gpu_precisions=[]"])
    assert result.exit_code == 0, result.output
    assert (out / "model.onnx").is_file() and (out / "parity.json").is_file()
    bad = CliRunner().invoke(app, ["export", "--out", str(out)])
    assert bad.exit_code == 1 and "--out goes with --model" in bad.output


@pytest.mark.slow
@pytest.mark.shared
def test_default_model_int8_stays_within_tolerance_on_scifact(shared_data, tmp_path):
    """The shipped model end to end: export stage with a SciFact subset as the eval set."""
    from embedtune.evaluate import load_beir

    data = load_beir(shared_data / "scifact")
    qids = list(data.queries)[:100]
    relevant = sorted({d for q in qids for d in data.qrels[q]})
    dids = relevant + [d for d in data.corpus if d not in set(relevant)][: 500 - len(relevant)]
    subset = tmp_path / "scifact-subset"
    write_jsonl(subset / "corpus.jsonl", [{"_id": d, **data.corpus[d]} for d in dids])
    write_jsonl(subset / "queries.jsonl", [{"_id": q, "text": data.queries[q]} for q in qids])
    write_text(subset / "qrels" / "test.tsv", "query-id\tcorpus-id\tscore\n" + "".join(
        f"{q}\t{d}\t{r}\n" for q in qids for d, r in data.qrels[q].items()))
    recipe = Recipe.model_validate({"model": {"name": "default"}, "eval": {"dataset": str(subset)}})
    run = RunDir(tmp_path / "run")
    manifest = run_export(recipe, run)
    report = json.loads(run.path("export", "parity.json").read_text())
    assert report["passed"] and report["fp32_vs_torch"]["min_cosine"] >= 0.9999
    assert report["int8_vs_fp32"]["retrieval"]["failures"] == []
    assert abs(manifest.metrics["int8_delta"]["ndcg@10"]) <= 0.01
