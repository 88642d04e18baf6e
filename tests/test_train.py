"""The finetune stage end to end on a tiny random BERT: outputs, best checkpoint, LoRA merge, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _train_helpers import make_run, synthetic_examples, tiny_recipe
from embedtune.artifacts import ArtifactError, read_jsonl
from embedtune.models import ModelNotFoundError
from embedtune.train import run_finetune

PROMPTS = {"query_prompt": "query: ", "passage_prompt": "passage: "}
TEXTS = ["stars and planets", "flour and butter", "interest rates rise"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert_dir):
    """One full-weights run: 32 training rows, 8 held-out queries, 2 epochs x 2 steps, evaluated each step."""
    run = make_run(tmp_path_factory.mktemp("ft") / "run", synthetic_examples(40))
    recipe = tiny_recipe(
        tiny_bert_dir,
        PROMPTS,
        epochs=2,
        checkpoint_steps=1,
        learning_rate=5e-3,
        validation_fraction=0.2,
        matryoshka_dims=[32, 16],
    )
    return recipe, run, run_finetune(recipe, run)


def test_output_is_a_sentence_transformers_folder_with_prompts(trained):
    from sentence_transformers import SentenceTransformer

    _, run, _ = trained
    model = SentenceTransformer(str(run.path("finetune", "model")))
    assert model.prompts["query"] == "query: " and model.prompts["document"] == "passage: "
    assert model.encode(TEXTS).shape == (3, 32)


def test_manifest_reports_steps_throughput_and_validation(trained):
    _, run, manifest = trained
    assert manifest.counts["steps"] == 4
    assert manifest.counts["train_examples"] == 32 and manifest.counts["val_queries"] == 8
    assert manifest.counts["global_batch_size"] == 16
    assert manifest.metrics["examples_per_second"] > 0 and manifest.metrics["train_seconds"] > 0
    assert manifest.metrics["matryoshka_dims"] == [32, 16]
    declared = json.loads(run.path("finetune", "model", "embedtune.json").read_text())
    assert declared == {"matryoshka_dims": [32, 16]}  # what the server accepts as `dimensions`
    assert 0 <= manifest.metrics["best_val_ndcg@10"] <= 1
    assert run.path("finetune", "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = run.path("finetune", "summary.md").read_text()
    assert "| steps | 4 |" in summary and "examples/s" in summary
    losses = [r for r in read_jsonl(run.path("finetune", "train_log.jsonl")) if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]


def test_keeps_the_best_checkpoint_not_the_last(trained):
    from sentence_transformers import SentenceTransformer

    from embedtune.train.data import load_examples, prepare
    from embedtune.train.trainer import build_evaluator

    recipe, run, manifest = trained
    history = list(read_jsonl(run.path("finetune", "train_log.jsonl")))
    scores = {r["step"]: r["eval_val_cosine_ndcg@10"] for r in history if "eval_val_cosine_ndcg@10" in r}
    assert len(scores) == 4
    assert manifest.metrics["best_val_ndcg@10"] == pytest.approx(max(scores.values()), abs=1e-5)
    assert scores[manifest.metrics["best_step"]] == max(scores.values())
    # The saved model scores exactly the best value on the same held-out queries.
    cfg = recipe.finetune
    data = prepare(
        load_examples(run.path("prep", "train.jsonl")),
        4,
        cfg.validation_fraction,
        cfg.val_corpus_size,
        cfg.seed,
    )
    model = SentenceTransformer(str(run.path("finetune", "model")))
    evaluator = build_evaluator(data.validation, model, 16)
    assert evaluator(model)[evaluator.primary_metric] == pytest.approx(max(scores.values()), abs=1e-5)


def test_unchanged_rerun_is_skipped(trained):
    recipe, run, _ = trained
    assert run_finetune(recipe, run).skipped


def test_lora_merged_saves_a_plain_model_that_differs_from_base(tmp_path, tiny_bert_dir, monkeypatch):
    """The saved model computes what the trained adapter computed (merge is exact to float tolerance), is not
    the base model, and is a plain BERT folder: no adapter files, no LoRA parameters."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from sentence_transformers import SentenceTransformer

    from embedtune.models import load_model
    from embedtune.train import driver, lora

    unmerged: dict[str, np.ndarray] = {}

    def record_then_merge(model):
        assert any(isinstance(m, BaseTunerLayer) for m in model.modules())  # the adapter is still separate
        unmerged["embeddings"] = model.encode(TEXTS)
        lora.merge_lora(model)

    monkeypatch.setattr(driver, "merge_lora", record_then_merge)
    run = make_run(tmp_path / "run", synthetic_examples(24))
    recipe = tiny_recipe(
        tiny_bert_dir, finetuning_type="lora_merged", max_steps=2, learning_rate=5e-2, validation_fraction=0.0
    )
    run_finetune(recipe, run)
    out = run.path("finetune", "model")
    names = {p.name for p in out.rglob("*")}
    assert not {n for n in names if "adapter" in n}, names
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert"
    tuned = SentenceTransformer(str(out))
    assert not any("lora" in name for name, _ in tuned.named_parameters())
    merged = tuned.encode(TEXTS)
    np.testing.assert_allclose(merged, unmerged["embeddings"], atol=1e-5)
    base = load_model(str(tiny_bert_dir))
    assert np.abs(merged - base.encode(TEXTS)).max() > 1e-3


def test_lora_on_unknown_architecture_fails_before_training(tmp_path, tiny_bert_dir, monkeypatch):
    from embedtune.train import lora

    monkeypatch.setattr(lora, "TARGETS", {k: v for k, v in lora.TARGETS.items() if k != "bert"})
    run = make_run(tmp_path / "run", synthetic_examples(24))
    with pytest.raises(lora.LoraTargetError, match="'bert'.*target_modules"):
        run_finetune(tiny_recipe(tiny_bert_dir, finetuning_type="lora_merged"), run)
    assert not run.path("finetune", "checkpoints").exists()


def test_missing_model_fails_before_training(tmp_path):
    run = make_run(tmp_path / "run", synthetic_examples(24))
    with pytest.raises(ModelNotFoundError):
        run_finetune(tiny_recipe(tmp_path / "no-such-model"), run)
    assert not run.path("finetune", "checkpoints").exists()


def test_empty_training_file_fails_before_loading_the_model(tmp_path):
    run = make_run(tmp_path / "run", [])
    with pytest.raises(ArtifactError, match="no training examples"):
        run_finetune(tiny_recipe(tmp_path / "never-loaded"), run)


def test_missing_prep_stage_is_a_clear_error(tmp_path, tiny_bert_dir):
    from embedtune.artifacts import RunDir

    with pytest.raises(ArtifactError, match="embedtune prep"):
        run_finetune(tiny_recipe(tiny_bert_dir), RunDir(tmp_path / "empty"))


def test_margin_mse_trains_toward_the_teacher_margins(tmp_path, tiny_bert_dir):
    """loss=margin_mse: rows carry prep's scores; training moves the student's margins toward them."""
    from embedtune.models import encode_passages, encode_queries, load_model

    rows = synthetic_examples(32, negatives=2)
    for r in rows:  # the teacher: positive 0.8, negatives 0.3 and 0.1 (margins 0.5 and 0.7)
        r["pos_scores"], r["neg_scores"] = [0.8], [0.3, 0.1]

    def margin_error(model) -> float:
        q = encode_queries(model, [r["query"] for r in rows])
        p = encode_passages(model, [r["pos_doc"][0] for r in rows])
        errors = []
        for j, target in enumerate((0.5, 0.7)):
            n = encode_passages(model, [r["neg_doc"][j] for r in rows])
            errors.append(np.abs((q * p).sum(1) - (q * n).sum(1) - target).mean())
        return float(np.mean(errors))

    run = make_run(tmp_path / "run", rows)
    recipe = tiny_recipe(tiny_bert_dir, loss="margin_mse", passages_per_query=3, epochs=3,
                         learning_rate=5e-3, validation_fraction=0.0)
    manifest = run_finetune(recipe, run)
    assert manifest.config["finetune"]["loss"] == "margin_mse"
    before = margin_error(load_model(str(tiny_bert_dir)))
    after = margin_error(load_model(str(run.path("finetune", "model"))))
    assert after < 0.5 * before, (before, after)


def test_margin_mse_without_scores_is_a_clear_error(tmp_path, tiny_bert_dir):
    run = make_run(tmp_path / "run", synthetic_examples(8))  # no pos_scores / neg_scores
    recipe = tiny_recipe(tiny_bert_dir, loss="margin_mse", validation_fraction=0.0, max_steps=1)
    with pytest.raises(ArtifactError, match="margin_mse needs prep's scores"):
        run_finetune(recipe, run)


def test_to_dataset_labels_are_the_positive_then_the_used_negatives_scores():
    from embedtune.schemas import TrainExample
    from embedtune.train.data import to_dataset

    rows = [TrainExample(**r) for r in synthetic_examples(3, negatives=3)]
    rows[0] = rows[0].model_copy(update={"pos_scores": [0.9], "neg_scores": [0.5, 0.4, 0.2]})
    rows[1] = rows[1].model_copy(update={"pos_scores": [0.7], "neg_scores": [0.6]})  # too few: left out
    data = to_dataset(rows, 2, seed=0, scores=True)
    assert data.num_rows == 1 and data["label"] == [pytest.approx([0.9, 0.5, 0.4])]
    assert data["negative_1"] == [rows[0].neg_doc[0]]
