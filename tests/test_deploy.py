"""The deploy stage: the release gate acts on eval's paired scores, the index holds exactly the retrieval
the gate chose, and the deployed search is checked against eval (chunk- and document-level qrels) before
the alias moves; paths resolve from anywhere; `serve --model RUN` serves what was deployed."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import make_documents
from embedtune.artifacts import RunDir, read_json, write_jsonl
from embedtune.config import load_recipe
from embedtune.corpus import run_corpus
from embedtune.deploy import DeployCheckError, run_deploy
from embedtune.evaluate import run_eval
from embedtune.models import load_model
from embedtune.retrieval import milvus
from embedtune.retrieval.beir import load_beir
from embedtune.retrieval.deployed import evaluate_index
from embedtune.retrieval.deployment import open_searcher, read_info
from embedtune.schemas import Chunk, read_rows

ALIAS = "run"


@pytest.fixture(scope="module")
def perturbed_dir(tiny_bert_dir, tmp_path_factory):
    """The tiny model with scrambled weights: a 'fine-tune' that retrieves far worse than the base."""
    import torch

    model = load_model(str(tiny_bert_dir))
    torch.manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 2.0 * (p.std() if p.numel() > 1 else 0.1))
    out = tmp_path_factory.mktemp("tiny-ft-bad")
    model.save(str(out))
    return out


def _evaluated_run(tmp_path, tiny_bert_dir, finetuned, *extra):
    """corpus -> a synthetic held-out set whose qrels name chunks -> a 'finetune' -> the real eval stage."""
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in make_documents(n_per_topic=2)))
    recipe = load_recipe(None, [f"corpus.path={docs}", f"model.name={tiny_bert_dir}", "name=dep",
                                "eval.matryoshka_sweep=false", *extra])
    run = RunDir(tmp_path / "run")
    run_corpus(recipe, run)
    chunks = list(read_rows(run.path("corpus", "chunks.jsonl"), Chunk))
    heldout = run.path("prep", "eval")
    write_jsonl(heldout / "corpus.jsonl", (c.beir() for c in chunks))
    write_jsonl(heldout / "queries.jsonl", ({"_id": f"q{i}", "text": " ".join(c.text.split()[2:6])}
                                            for i, c in enumerate(chunks)))
    (heldout / "qrels").mkdir()
    (heldout / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(
        f"q{i}\t{c.id}\t1\n" for i, c in enumerate(chunks)))
    run.stage("prep", {}).finish(outputs=[heldout])
    shutil.copytree(finetuned, run.path("finetune", "model"))
    run.stage("finetune", {}).finish(outputs=[run.path("finetune", "model")])
    run_eval(recipe, run)
    return recipe, run


def test_the_champion_stays_when_the_challenger_loses_and_the_index_holds_it(tmp_path, tiny_bert_dir,
                                                                             perturbed_dir, monkeypatch):
    recipe, run = _evaluated_run(tmp_path, tiny_bert_dir, perturbed_dir)
    results = read_json(run.path("eval", "results.json"))
    manifest = run_deploy(recipe, run)
    decision = read_json(run.path("deploy", "decision.json"))
    # One verdict: what eval's report recommended is what was deployed, and it is the base model.
    assert decision["deployed"] == results["release"]["deployed"] == manifest.counts["deployed"]
    assert decision["model"] == "base" and not manifest.counts["challenger_won"]
    assert decision["difference"]["low"] <= 0  # the scrambled fine-tune does not win beyond the noise
    info = read_info(run.root)
    assert info.model_label == "base" and info.mode == decision["mode"]
    assert info.bm25_weight == results["hybrid"]["bm25_weight"] == decision["bm25_weight"]
    # The deployed search was checked on the deciding (chunk-level) queries against eval's own figure.
    check = read_json(run.path("deploy", "check.json"))
    assert check["passed"] and check["qrels_level"] == "chunk" and check["against_eval"] == "compared"
    mode = decision["mode"]
    assert check["deployed"][mode]["ndcg@10"] > 0.3
    assert check["deployed"][mode]["ndcg@10"] == pytest.approx(check["eval"]["ndcg@10"], abs=0.01)
    # Paths in index.json resolve from any working directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    hits = open_searcher(run.root).search(["scrambled query words"], mode=mode, top_k=3)
    assert len(hits[0]) == 3


def test_a_deployed_model_other_than_the_decision_fails_the_check_and_keeps_the_alias(
        tmp_path, tiny_bert_dir, perturbed_dir, monkeypatch):
    import embedtune.deploy.stage as stage

    # Dense only: fused with BM25, these tiny documents rank alike under any model and hide the swap.
    recipe, run = _evaluated_run(tmp_path, tiny_bert_dir, perturbed_dir, "eval.bm25=false", "index.bm25=false")
    run_deploy(recipe, run)  # the base model, checked and aliased
    assert read_json(run.path("deploy", "decision.json"))["deployed"] == "base"
    lite = str(run.path("deploy", "milvus.db"))
    client = milvus.connect(lite)
    first = milvus.resolve_alias(client, ALIAS)
    milvus.release(client, lite)
    wrong = stage.ServedModel("torch", str(run.path("finetune", "model")), None, "fine-tuned")
    monkeypatch.setattr(stage, "model_for", lambda decision, recipe, run: wrong)  # a bug: not what was decided
    with pytest.raises(DeployCheckError, match="does not reproduce eval"):
        run_deploy(recipe, run, force=True)
    client = milvus.connect(str(run.path("deploy", "milvus.db")))
    assert milvus.resolve_alias(client, ALIAS) == first  # the working deployment still answers
    assert read_info(run.root).model_label == "base"


def test_force_deploys_the_challenger_and_serve_follows_the_deployment(tmp_path, tiny_bert_dir, perturbed_dir):
    from embedtune.serve.loading import model_entry

    recipe, run = _evaluated_run(tmp_path, tiny_bert_dir, perturbed_dir, "deploy.force=true", "deploy.check=false")
    run_deploy(recipe, run)
    decision = read_json(run.path("deploy", "decision.json"))
    assert decision["forced"] and decision["model"] == "finetuned" and "forced" in decision["served"]
    raw = json.loads(run.path("deploy", "index.json").read_text())
    assert raw["model_path"] == "finetune/model"  # relative to the run: the run directory can move
    assert model_entry(str(run.root)).source == str(run.path("finetune", "model").resolve())


def test_without_eval_the_base_model_is_deployed(tmp_path, tiny_bert_dir):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in make_documents(n_per_topic=1)))
    recipe = load_recipe(None, [f"corpus.path={docs}", f"model.name={tiny_bert_dir}"])
    run = RunDir(tmp_path / "run")
    run_corpus(recipe, run)
    run_deploy(recipe, run)
    decision = read_json(run.path("deploy", "decision.json"))
    assert decision["deployed"] == "base_hybrid" and "no fine-tuned model" in decision["reason"]
    assert read_json(run.path("deploy", "check.json")) == {"skipped": "no eval results"}


def test_document_level_qrels_score_documents_and_a_zero_never_passes(tmp_path, tiny_bert_dir, perturbed_dir):
    recipe, run = _evaluated_run(tmp_path, tiny_bert_dir, perturbed_dir, "deploy.check=false")
    run_deploy(recipe, run)
    searcher = open_searcher(run.root)
    docs = make_documents(n_per_topic=2)
    folder = tmp_path / "doc-level"
    write_jsonl(folder / "corpus.jsonl", docs)
    write_jsonl(folder / "queries.jsonl", ({"_id": f"d{i}", "text": " ".join(d["text"].split()[1:5])}
                                           for i, d in enumerate(docs)))
    (folder / "qrels").mkdir()
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"d{i}\t{d['_id']}\t1\n"
                                                                     for i, d in enumerate(docs)))
    result = evaluate_index(searcher, load_beir(folder), modes=("dense",))
    assert result.level == "document" and result.deployed["dense"]["ndcg@10"] > 0.3 and not result.failures
    # Qrels naming ids the index does not hold: every score is zero, and that is a failure, not a pass.
    (folder / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + "".join(f"d{i}\tnot-here\t1\n"
                                                                     for i in range(len(docs))))
    (folder / "corpus.jsonl").write_text(json.dumps({"_id": "not-here", "text": "x"}) + "\n")
    zero = evaluate_index(searcher, load_beir(folder), modes=("dense",))
    assert zero.deployed["dense"]["ndcg@10"] == 0 and any("found no relevant" in f for f in zero.failures)
