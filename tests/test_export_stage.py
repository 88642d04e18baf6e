"""The export stage: which model it exports, parity.json, failure handling, resume; and the CLI."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from embedtune.artifacts import RunDir, write_jsonl, write_text
from embedtune.config import Recipe
from embedtune.convert import parity as parity_mod
from embedtune.export import ParityError, run_export


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
    assert "export/model.int8.onnx" in manifest.outputs
    again = run_export(_recipe(tiny_bert_dir), run)
    assert again.skipped  # unchanged inputs and config: resumed, not redone


def _torch_fp32_metrics(model_dir: Path, docs: list[dict[str, str]], k_values: list[int]) -> dict[str, float]:
    """nDCG@k / Recall@k of the PyTorch fp32 model on the eval set written by _fake_eval_set, computed here with
    sentence-transformers and pytrec_eval directly (none of the export or eval stage's code)."""
    import pytrec_eval
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu")
    queries = [d["text"].split(".")[0] for d in docs]
    scores = model.encode(queries, normalize_embeddings=True) @ model.encode(
        [f"{d['title']} {d['text']}" for d in docs], normalize_embeddings=True).T
    run = {f"q{i}": {d["_id"]: float(scores[i, j]) for j, d in enumerate(docs)} for i in range(len(docs))}
    qrels = {f"q{i}": {d["_id"]: 1} for i, d in enumerate(docs)}
    cuts = ",".join(map(str, k_values))
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {f"ndcg_cut.{cuts}", f"recall.{cuts}"}).evaluate(run)
    return {f"{name}@{k}": sum(q[f"{key}_{k}"] for q in per_query.values()) / len(per_query)
            for k in k_values for name, key in (("ndcg", "ndcg_cut"), ("recall", "recall"))}


def test_finetuned_model_is_preferred_and_int8_checked_on_the_eval_set(tiny_bert_dir, tmp_path, topical_docs):
    run = RunDir(tmp_path / "run")
    finetuned = _fake_finetune(run, tiny_bert_dir)
    _fake_eval_set(run, topical_docs)
    manifest = run_export(_recipe(tiny_bert_dir), run)  # the real tolerances: 0.03 at k < 5, 0.01 at k >= 5
    assert json.loads(run.path("export", "embedtune.json").read_text())["source"] == str(finetuned)
    report = json.loads(run.path("export", "parity.json").read_text())
    retrieval = report["int8_vs_fp32"]["retrieval"]
    assert retrieval["tolerances"] == {"k<5": 0.03, "k>=5": 0.01}
    assert retrieval["fp32_vectors"] == "fp32 graph"  # no eval stage ran: nothing cached to stand in
    assert retrieval["queries"] == len(topical_docs) and retrieval["documents"] == len(topical_docs)
    assert set(retrieval["delta"]) == {"ndcg@1", "recall@1", "ndcg@5", "recall@5"}
    assert report["passed"] and retrieval["passed"] and retrieval["failures"] == []
    # Against an fp32 result computed independently from the PyTorch model: the stage's fp32 figures are
    # those, and int8 stays within the tolerances of them.
    expected = _torch_fp32_metrics(finetuned, topical_docs, [1, 5])
    assert 0 < expected["ndcg@5"] < 1  # a ranking that can drift, not a trivially perfect one
    for key, fp32 in expected.items():
        tolerance = 0.03 if key.endswith("@1") else 0.01
        assert retrieval["fp32"][key] == pytest.approx(fp32, abs=1e-4), key
        assert retrieval["int8"][key] - fp32 >= -tolerance - 1e-9, (key, retrieval["int8"][key], fp32)
        assert retrieval["delta"][key] == pytest.approx(retrieval["int8"][key] - retrieval["fp32"][key], abs=1e-4)
    assert manifest.metrics["int8_delta"] == retrieval["delta"]


def test_int8_parity_takes_the_fp32_side_from_the_eval_stages_cached_vectors(tiny_bert_dir, tmp_path, topical_docs,
                                                                           monkeypatch):
    """After eval, the fp32 graph does not encode the eval set again: the eval stage's cached PyTorch vectors
    of the same model stand in for it, and the figures are the same as PyTorch's, computed independently."""
    from embedtune.evaluate import evaluate_encoder, load_beir, load_encoder
    from embedtune.retrieval.cache import run_embedding_cache
    from embedtune.retrieval.onnx import OnnxEncoder

    run = RunDir(tmp_path / "run")
    finetuned = _fake_finetune(run, tiny_bert_dir)
    _fake_eval_set(run, topical_docs)
    recipe = _recipe(tiny_bert_dir)
    # What the eval stage does for the fine-tuned model: its vectors go into the run's embedding cache.
    evaluate_encoder(load_encoder(recipe.model, "fine-tuned", path=finetuned), load_beir(run.path("prep", "eval")),
                     cache=run_embedding_cache(run.root))
    encoded: list[tuple[str, int]] = []
    real_encode = OnnxEncoder.encode

    def counting(self, texts, *args, **kwargs):
        encoded.append((self.precision, len(texts)))
        return real_encode(self, texts, *args, **kwargs)

    monkeypatch.setattr(OnnxEncoder, "encode", counting)
    run_export(recipe, run)
    retrieval = json.loads(run.path("export", "parity.json").read_text())["int8_vs_fp32"]["retrieval"]
    assert retrieval["fp32_vectors"] == "eval's cached PyTorch vectors"
    assert ("int8", len(topical_docs)) in encoded and ("fp32", len(topical_docs)) not in encoded
    for key, fp32 in _torch_fp32_metrics(finetuned, topical_docs, [1, 5]).items():
        assert retrieval["fp32"][key] == pytest.approx(fp32, abs=1e-4), key


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


def test_export_resumes_after_an_interrupted_run_and_redoes_a_changed_model(tiny_bert_dir, tmp_path):
    """Rerun semantics: an export killed half-way (no manifest, a half-written model.onnx) is redone into a
    valid export; an unchanged rerun touches nothing; a changed fine-tuned model is exported again."""
    from sentence_transformers import SentenceTransformer

    from embedtune.export import OnnxEncoder

    run = RunDir(tmp_path / "run")
    finetuned = _fake_finetune(run, tiny_bert_dir)
    recipe = _recipe(tiny_bert_dir)
    out = run.path("export")
    out.mkdir(parents=True)
    (out / "model.onnx").write_bytes(b"\x08\x07 half a protobuf")  # what a kill -9 mid-write leaves
    first = run_export(recipe, run)
    assert not first.skipped and first.counts["parity"] == "passed"
    texts = ["how do vaccines work", "Bond prices fall when rates rise."]

    def onnx_vectors():
        return OnnxEncoder(out, "fp32").encode(texts)

    torch_vectors = SentenceTransformer(str(finetuned), device="cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(onnx_vectors() - torch_vectors).max() < 1e-4

    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()}
    again = run_export(recipe, run)
    assert again.skipped
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.is_file()} == mtimes

    # The fine-tune is redone with other weights: the export is redone from them, not skipped.
    import torch

    changed = SentenceTransformer(str(finetuned), device="cpu")
    with torch.no_grad():
        for p in changed.parameters():
            p.add_(0.05 * torch.randn_like(p))
    changed.save(str(finetuned))
    redone = run_export(recipe, run)
    assert not redone.skipped
    new_vectors = changed.encode(texts, normalize_embeddings=True)
    assert np.abs(onnx_vectors() - new_vectors).max() < 1e-4
    assert np.abs(new_vectors - torch_vectors).max() > 1e-3


class _RankingEncoder:
    """Stands in for an OnnxEncoder: query i and document i share a direction unless the query is in ``lost``,
    whose embedding then points at another document (that query's hit is ranked last)."""

    prompts: dict[str, str] = {}

    def __init__(self, precision: str, n: int, lost: set[int]):
        self.precision, self.n, self.lost = precision, n, lost

    def encode(self, texts, prompt_name=None, batch_size=32):  # noqa: ANN001, ANN201
        eye = np.eye(self.n, dtype=np.float32)
        if texts[0].startswith("doc"):
            return eye
        # a lost query scores its own document -1: last, whatever the order of the tied zeros
        return np.stack([eye[(i + 1) % self.n] - eye[i] if i in self.lost else eye[i] for i in range(self.n)])


@pytest.mark.parametrize(("fp32_lost", "int8_lost", "passed"), [
    ({0, 1, 2, 3}, set(), True),   # int8 finds four more queries' documents: a gain, never a failure
    (set(), {0, 1, 2, 3}, False),  # int8 loses four: recall@5 -0.2, beyond the tolerance and one query (0.05)
    (set(), {7}, True),            # int8 loses one query of 20: one rank flip is not a finding
    (set(), set(), True),
])
def test_the_retrieval_gate_fails_a_loss_beyond_tolerance_not_a_gain(tmp_path, fp32_lost, int8_lost, passed):
    from embedtune.convert.parity import retrieval_vs_fp32

    n = 20
    write_jsonl(tmp_path / "corpus.jsonl", [{"_id": f"d{i}", "text": f"doc {i}"} for i in range(n)])
    write_jsonl(tmp_path / "queries.jsonl", [{"_id": f"q{i}", "text": f"query {i}"} for i in range(n)])
    write_text(tmp_path / "qrels" / "test.tsv",
               "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(n)))
    report = retrieval_vs_fp32(_RankingEncoder("fp32", n, fp32_lost), _RankingEncoder("int8", n, int8_lost),
                               tmp_path, [1, 5], tolerance_low_k=0.03, tolerance_high_k=0.01)
    assert report["passed"] is passed and bool(report["failures"]) is not passed
    sign = len(fp32_lost) - len(int8_lost)
    assert report["delta"]["recall@5"] == pytest.approx(sign / n)
    if not passed:
        assert "loss 0.2000 > 0.05" in " ".join(report["failures"])  # the tolerance grown to one query of 20
    assert report["one_query"] == pytest.approx(1 / n)


def _scramble_one_layer(graph: Path) -> str:
    """Permute the rows of the int8 graph's token embedding table in place (a converter bug or a corrupted
    file: the graph still loads and runs, its tokens look up other tokens' vectors). On the tiny random BERT
    the embedding layer is the one whose damage shows: its encoder layers' outputs are small next to the
    residual stream (scrambling a quantised attention matrix moved no cosine below 0.9997)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(graph))
    target = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(target)
    assert values.ndim == 2 and values.shape[0] > 10_000, f"{target.name} {values.shape} is no embedding table"
    scrambled = values[np.random.default_rng(0).permutation(values.shape[0])]
    target.CopyFrom(numpy_helper.from_array(scrambled, target.name))
    onnx.save(model, str(graph))
    return target.name


def test_a_damaged_int8_graph_is_never_deployed(tiny_bert_dir, tmp_path, topical_docs, monkeypatch, caplog):
    """The int8 graph is built, then one layer's weights are scrambled: its retrieval on the eval set falls
    beyond the tolerance. The stage keeps it on disk for inspection, says which metrics failed, and the
    `auto` precision that serve, the deploy stage and the platform use falls back to fp32."""
    from embedtune.convert import formats
    from embedtune.retrieval.encoders import served_model

    real = formats.FORMATS["int8"]
    damaged: list[str] = []

    def build_then_damage(ctx: formats.BuildContext) -> dict:
        record = real.build(ctx)
        damaged.append(_scramble_one_layer(ctx.path("int8")))
        return record

    monkeypatch.setitem(formats.FORMATS, "int8", formats.ExportFormat("int8", real.wanted, build_then_damage,
                                                                      real.parity_vs_fp32))
    run = RunDir(tmp_path / "run")
    _fake_finetune(run, tiny_bert_dir)
    _fake_eval_set(run, topical_docs)
    with caplog.at_level("WARNING"):
        manifest = run_export(_recipe(tiny_bert_dir), run)
    assert damaged and manifest.counts["parity"] == "int8 failed: fp32 is deployed"
    assert re.search(r"int8 failed, so the fp32 graph is what gets deployed.*(ndcg|recall)@\d+: int8 ", caplog.text,
                     re.S)
    report = json.loads(run.path("export", "parity.json").read_text())
    assert report["fp32_vs_torch"]["passed"] and not report["passed"]  # fp32 is fine: the int8 graph failed it
    assert not report["int8_vs_fp32"]["retrieval"]["passed"]
    served = served_model(run.root)
    assert (served.kind, served.precision) == ("onnx", "fp32")  # the failed int8 graph is not what answers
