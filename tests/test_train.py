"""The finetune stage end to end on a tiny random BERT: outputs, best checkpoint, LoRA merge, bad input."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from _train_helpers import make_run, synthetic_examples, tiny_recipe
from embedtune.artifacts import ArtifactError, read_jsonl
from embedtune.events import listening
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
    t0 = time.perf_counter()
    with listening(EVENTS.append):  # what the platform worker subscribes to
        manifest = run_finetune(recipe, run)
    return recipe, run, manifest, time.perf_counter() - t0


EVENTS: list = []


def test_training_publishes_steps_epochs_and_losses_to_listeners(trained):
    from embedtune.events import TrainingEvent, publish

    begin = [e for e in EVENTS if e.kind == "begin"]
    assert len(begin) == 1 and begin[0].max_steps == 4 and begin[0].num_epochs == 2
    assert [e.step for e in EVENTS if e.kind == "step"] == [1, 2, 3, 4]
    assert [e.epoch for e in EVENTS if e.kind == "step"][-1] == pytest.approx(2.0)
    assert [e.step for e in EVENTS if e.kind == "log" and "loss" in e.logs] == [1, 2, 3, 4]
    published = len(EVENTS)
    publish(TrainingEvent("step", 5, 4, 2.0, 2.0))  # outside the listening block: nobody hears it
    assert len(EVENTS) == published


def _validation_scorer(recipe, run):
    """The stage's own held-out split of prep/train.jsonl, and an evaluator over it (nDCG@10 of a model)."""
    from embedtune.train.data import load_examples, prepare
    from embedtune.train.trainer import build_evaluator

    cfg = recipe.finetune
    data = prepare(load_examples(run.path("prep", "train.jsonl")), cfg.passages_per_query - 1,
                   cfg.validation_fraction, cfg.val_corpus_size, cfg.seed)

    def score(model) -> float:
        evaluator = build_evaluator(data.validation, model, 16)
        return float(evaluator(model)[evaluator.primary_metric])

    return data, score


def test_output_is_a_sentence_transformers_folder_with_prompts(trained):
    from sentence_transformers import SentenceTransformer

    _, run, _, _ = trained
    model = SentenceTransformer(str(run.path("finetune", "model")))
    assert model.prompts["query"] == "query: " and model.prompts["document"] == "passage: "
    assert model.encode(TEXTS).shape == (3, 32)


def test_manifest_reports_steps_throughput_and_validation(trained):
    from embedtune.models import load_model

    recipe, run, manifest, wall_seconds = trained
    assert manifest.counts["steps"] == 4
    assert manifest.counts["train_examples"] == 32 and manifest.counts["val_queries"] == 8
    assert manifest.counts["global_batch_size"] == 16
    # Training time lies within the stage's wall time; throughput counts optimizer steps only (evaluation
    # and checkpoint writes excluded), so it is at least 4 steps x 16 examples over the whole training time.
    train_seconds = manifest.metrics["train_seconds"]
    assert 0 < train_seconds <= wall_seconds
    assert manifest.metrics["examples_per_second"] >= 4 * 16 / train_seconds * 0.99
    assert manifest.metrics["matryoshka_dims"] == [32, 16]
    declared = json.loads(run.path("finetune", "model", "embedtune.json").read_text())
    assert declared == {"matryoshka_dims": [32, 16]}  # what the server accepts as `dimensions`
    # Validation figures, re-derived: the base model (with the recipe's prompts) on the held-out split, and
    # the best logged one.
    _, score = _validation_scorer(recipe, run)
    assert manifest.metrics["base_val_ndcg@10"] == pytest.approx(score(load_model(recipe.model)), abs=1e-5)
    logged = [r["eval_val_cosine_ndcg@10"] for r in read_jsonl(run.path("finetune", "train_log.jsonl"))
              if "eval_val_cosine_ndcg@10" in r]
    assert manifest.metrics["best_val_ndcg@10"] == pytest.approx(max(logged), abs=1e-5)
    assert run.path("finetune", "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = run.path("finetune", "summary.md").read_text()
    assert "| steps | 4 |" in summary and "examples/s" in summary
    losses = [r for r in read_jsonl(run.path("finetune", "train_log.jsonl")) if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4]


def test_saved_model_scores_the_best_logged_validation_value(trained):
    from sentence_transformers import SentenceTransformer

    recipe, run, manifest, _ = trained
    history = list(read_jsonl(run.path("finetune", "train_log.jsonl")))
    scores = {r["step"]: r["eval_val_cosine_ndcg@10"] for r in history if "eval_val_cosine_ndcg@10" in r}
    assert sorted(scores) == [1, 2, 3, 4]
    assert scores[manifest.metrics["best_step"]] == max(scores.values())
    # The saved model scores exactly the best value on the same held-out queries.
    _, score = _validation_scorer(recipe, run)
    assert score(SentenceTransformer(str(run.path("finetune", "model")))) == pytest.approx(
        max(scores.values()), abs=1e-5)


def test_keeps_the_best_checkpoint_not_the_last(tmp_path, tiny_bert_dir, monkeypatch):
    """A run whose validation peaks at step 2 of 4: the saved model is step 2's weights, not step 4's."""
    from sentence_transformers import SentenceTransformer

    from embedtune.train import stage as driver

    # The held-out score after each step, as if training overfits after step 2 (the first call scores the
    # base model). The evaluator still really runs; only its primary figure is replaced by this curve.
    curve = iter([0.10, 0.30, 0.90, 0.50, 0.40])
    real_build = driver.build_evaluator

    def build_with_curve(*args, **kwargs):
        evaluator = real_build(*args, **kwargs)
        real_call = evaluator.__call__

        class Curve(type(evaluator)):
            def __call__(self, model, *a, **kw):
                scores = real_call(model, *a, **kw)
                return {**scores, self.primary_metric: next(curve)}

        evaluator.__class__ = Curve
        return evaluator

    monkeypatch.setattr(driver, "build_evaluator", build_with_curve)
    run = make_run(tmp_path / "run", synthetic_examples(40))
    recipe = tiny_recipe(tiny_bert_dir, epochs=2, checkpoint_steps=1, learning_rate=5e-3,
                         validation_fraction=0.2, save_total_limit=None)
    manifest = run_finetune(recipe, run)
    assert manifest.counts["steps"] == 4
    assert (manifest.metrics["best_step"], manifest.metrics["best_val_ndcg@10"]) == (2, 0.9)
    assert manifest.metrics["base_val_ndcg@10"] == 0.1

    def vectors(folder) -> np.ndarray:
        return SentenceTransformer(str(folder), device="cpu").encode(TEXTS)

    saved = vectors(run.path("finetune", "model"))
    checkpoints = run.path("finetune", "checkpoints")
    np.testing.assert_allclose(saved, vectors(checkpoints / "checkpoint-2"), atol=1e-6)
    assert np.abs(saved - vectors(checkpoints / "checkpoint-4")).max() > 1e-4  # the last really differs


def test_cpu_bf16_trains_under_autocast_and_saves_fp32_weights(tmp_path, tiny_bert_dir, monkeypatch):
    """cpu_bf16=true: the training forward runs in bf16 (read off a layer's output), the optimizer keeps fp32
    weights, the manifest says so, and the saved model has moved and reloads in fp32."""
    import torch

    from embedtune.models import load_model
    from embedtune.train import stage as driver

    dtypes: set[torch.dtype] = set()

    def load_and_watch(*args, **kwargs):
        model = load_model(*args, **kwargs)
        layer = model[0].auto_model.encoder.layer[0].intermediate.dense
        layer.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype) if module.training else None)
        return model

    monkeypatch.setattr(driver, "load_model", load_and_watch)
    run = make_run(tmp_path / "run", synthetic_examples(24))
    recipe = tiny_recipe(tiny_bert_dir, max_steps=2, learning_rate=5e-3, validation_fraction=0.0, cpu_bf16=True)
    manifest = run_finetune(recipe, run)
    assert dtypes == {torch.bfloat16}
    assert manifest.metrics["precision"] == "bf16-mixed"
    tuned = load_model(str(run.path("finetune", "model")))
    assert {p.dtype for p in tuned.parameters()} == {torch.float32}
    assert np.abs(tuned.encode(TEXTS) - load_model(str(tiny_bert_dir)).encode(TEXTS)).max() > 1e-3


def test_attention_dropout_applies_while_training_and_the_saved_config_keeps_its_own(tmp_path, tiny_bert_dir,
                                                                                    monkeypatch):
    from embedtune.models import load_model
    from embedtune.train import stage as driver

    rates: list[float] = []

    def load_and_watch(*args, **kwargs):
        model = load_model(*args, **kwargs)
        attention = model[0].auto_model.encoder.layer[0].attention.self
        attention.register_forward_hook(
            lambda module, args, output: rates.append(module.dropout.p) if module.training else None)
        return model

    monkeypatch.setattr(driver, "load_model", load_and_watch)
    run = make_run(tmp_path / "run", synthetic_examples(24))
    run_finetune(tiny_recipe(tiny_bert_dir, max_steps=2, validation_fraction=0.0), run)  # the default: 0
    assert rates and set(rates) == {0.0}
    saved = json.loads(run.path("finetune", "model", "config.json").read_text())
    original = json.loads((tiny_bert_dir / "config.json").read_text())
    assert saved["attention_probs_dropout_prob"] == original["attention_probs_dropout_prob"] == 0.1


def test_unchanged_rerun_is_skipped(trained):
    recipe, run, _, _ = trained
    assert run_finetune(recipe, run).skipped


def test_lora_merged_saves_a_plain_model_that_differs_from_base(tmp_path, tiny_bert_dir, monkeypatch):
    """The saved model computes what the trained adapter computed (merge is exact to float tolerance), is not
    the base model, and is a plain BERT folder: no adapter files, no LoRA parameters."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from sentence_transformers import SentenceTransformer

    from embedtune.models import load_model
    from embedtune.train import lora
    from embedtune.train import stage as driver

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


def _without_dropout(src, dst):
    """A copy of the tiny model with dropout off: GradCache then computes exactly MNRL's loss and gradient."""
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_cached_mnrl_trains_in_mini_batches_like_mnrl_on_the_whole_batch(tmp_path, tiny_bert_dir, monkeypatch):
    """loss=cached_mnrl end to end: the encoder never sees more than micro_batch_size texts at once, yet the
    loss and the trained model are those of plain MNRL on the whole batch of 16 (GradCache is exact)."""
    from embedtune.models import load_model
    from embedtune.train import stage as driver

    model_dir = _without_dropout(tiny_bert_dir, tmp_path / "no-dropout")
    rows = synthetic_examples(32, negatives=2)
    seen: list[int] = []

    def load_and_watch(*args, **kwargs):
        model = load_model(*args, **kwargs)
        # Texts per encoder pass, read off the embedding layer's output (batch, tokens, hidden).
        model[0].auto_model.embeddings.register_forward_hook(
            lambda module, args, output: seen.append(int(output.shape[0])))
        return model

    def train(loss: str, **extra):
        run = make_run(tmp_path / loss, rows)
        # fp32 on every CPU: GradCache is exact in fp32; bf16 rounds its two passes differently.
        recipe = tiny_recipe(model_dir, loss=loss, passages_per_query=3, max_steps=2, learning_rate=5e-3,
                             validation_fraction=0.0, cpu_bf16=False, **extra)
        return run, run_finetune(recipe, run)

    monkeypatch.setattr(driver, "load_model", load_and_watch)
    cached_run, cached = train("cached_mnrl", micro_batch_size=4)
    assert cached.counts["loss"] == "cached_mnrl" and cached.counts["steps"] == 2
    assert cached.counts["per_device_batch_size"] == 16
    assert seen and max(seen) == 4, sorted(set(seen))
    seen.clear()
    plain_run, plain = train("mnrl")
    assert plain.counts["loss"] == "mnrl" and max(seen) == 16 * 3  # all passages of the batch in one pass

    def losses(run) -> list[float]:
        return [r["loss"] for r in read_jsonl(run.path("finetune", "train_log.jsonl")) if "loss" in r]

    assert losses(cached_run) == pytest.approx(losses(plain_run), rel=1e-4)
    base = load_model(str(model_dir)).encode(TEXTS)
    tuned_cached = load_model(str(cached_run.path("finetune", "model"))).encode(TEXTS)
    tuned_plain = load_model(str(plain_run.path("finetune", "model"))).encode(TEXTS)
    moved = np.abs(tuned_cached - base).max()
    assert moved > 1e-3
    assert np.abs(tuned_cached - tuned_plain).max() < 0.05 * moved, (moved, np.abs(tuned_cached - tuned_plain).max())
