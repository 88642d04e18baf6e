"""The finetune stage: prep/train.jsonl -> finetune/model (a sentence-transformers folder with its prompts).

Order matters for the user: everything that can be wrong with the input, the model or the recipe is checked
before the first optimizer step, so a bad run fails in seconds rather than after an hour.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from embedtune.artifacts import Manifest, RunDir, config_hash, write_text
from embedtune.config import FinetuneConfig, Recipe
from embedtune.console import log
from embedtune.models import load_model, resolve
from embedtune.retrieval.metadata import write_metadata
from embedtune.train.card import base_facts, model_card
from embedtune.train.data import TrainingData, load_examples, prepare, to_dataset
from embedtune.train.distributed import init_distributed
from embedtune.train.dropout import set_attention_dropout
from embedtune.train.lora import add_lora, merge_lora
from embedtune.train.losses import LOSSES, build_loss
from embedtune.train.machine import Hardware, hardware, return_freed_tensors_to_the_os
from embedtune.train.matryoshka import matryoshka_dims
from embedtune.train.memory import MemoryBudget, memory_budget, typical_query_tokens
from embedtune.train.plan import BatchPlan, plan_batches
from embedtune.train.report import plot_curves, write_log, write_summary
from embedtune.train.trainer import (
    PublishProgress,
    Throughput,
    build_evaluator,
    clean_checkpoints,
    close_progress,
    column_prompts,
    last_checkpoint,
    quiet_trainer,
    training_arguments,
)

STAGE = "finetune"


def _holds_every_step(trainer, checkpoint: str, total_steps: int) -> bool:  # noqa: ANN001
    """When ``checkpoint`` is the run's last step (the stage was stopped after training, before its manifest),
    load it (or the best checkpoint it names) into ``trainer`` and return True. transformers' resume would
    otherwise skip the epoch's trained batches and run one more step past ``max_steps``."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    if state.global_step < total_steps:
        return False
    best = state.best_model_checkpoint if trainer.args.load_best_model_at_end else None
    weights = best if best and Path(best).is_dir() else checkpoint
    trainer._load_from_checkpoint(weights)  # the same loader trainer.train(resume_from_checkpoint=...) uses
    trainer.state = state
    return True


def run_finetune(recipe: Recipe, run: RunDir, *, force: bool = False, resume: bool = True) -> Manifest:
    """Train, keep the best checkpoint by validation nDCG@10, save ``finetune/model``; resumes."""
    cfg = recipe.finetune
    _check_recipe(cfg)
    dist = init_distributed()
    train_file = run.require("prep", "train.jsonl")
    examples = load_examples(train_file)
    config = {"finetune": cfg.model_dump(mode="json"), "model": recipe.model.model_dump(mode="json")}
    stage = run.stage(STAGE, config, inputs=[train_file])
    done = dist.from_main(stage.up_to_date(force) if dist.is_main else None)
    if done is not None:
        return done

    model = _load_for_training(recipe, cfg)
    data = prepare(examples, cfg.passages_per_query - 1, cfg.validation_fraction, cfg.val_corpus_size, cfg.seed)
    _report_data(data, len(examples), cfg)
    hw, memory, plan, dims = _plan_training(cfg, model, data, dist.world_size)
    evaluator = build_evaluator(data.validation, model, plan.per_device) if data.validation else None
    base_score, metric = _evaluate_base(evaluator, model)
    checkpoints = stage.dir / "checkpoints"
    resume_from = _resume_point(checkpoints, config_hash({"config": config, "inputs": stage.inputs}), dist,
                                keep=resume and not force)
    trainer, throughput = _trainer(cfg, plan, hw, model, data, evaluator, metric, checkpoints, dims)
    seconds = _train(trainer, resume_from, plan.total_steps)

    manifest = None
    if dist.is_main:
        metrics = {"train_seconds": round(seconds, 2),
                   "examples_per_second": round(throughput.examples_per_second, 3),
                   "base_val_ndcg@10": base_score, "resumed_from_step": _step_of(resume_from),
                   "precision": "bf16-mixed" if hw.bf16 else "fp32", **_memory_plan(memory, plan)}
        manifest = _finish(stage, model, trainer, cfg, plan, data, dims, len(examples), metrics, metric,
                           (base_facts(resolve(recipe.model).path, recipe.model.name), config))
    dist.barrier()
    return manifest if manifest is not None else run.manifest(STAGE)  # type: ignore[return-value]


def _load_for_training(recipe: Recipe, cfg: FinetuneConfig):  # noqa: ANN202 - a SentenceTransformer
    model = load_model(recipe.model)
    if cfg.finetuning_type == "lora_merged":
        # An unknown architecture fails here, before anything else happens. Added before the memory plan, which
        # then charges optimizer state to the adapters only; they start at zero (peft's LoRA B = 0), so the
        # base evaluation still scores the base model exactly.
        add_lora(model, cfg.lora)
    if cfg.attention_dropout is not None:
        changed = set_attention_dropout(model, cfg.attention_dropout)
        log.info("attention dropout %g in %d layers while training", cfg.attention_dropout, changed)
    return model


def _plan_training(cfg: FinetuneConfig, model, data: TrainingData,  # noqa: ANN001 - a SentenceTransformer
                   world_size: int) -> tuple[Hardware, MemoryBudget | None, BatchPlan, list[int] | None]:
    """The machine, the memory budget, the batch plan and the Matryoshka sizes, said in one log line."""
    hw = hardware(cfg.cpu_bf16)
    if not hw.cuda:
        return_freed_tensors_to_the_os()  # else glibc keeps a forward's freed temporaries: ~1.5 GB on a 135M decoder
    # Passages (positive + hard negatives) run to the model's max length; queries at their typical length.
    memory = memory_budget(model, data.negatives + 1, hw, world_size=world_size,
                           query_tokens=typical_query_tokens(model, [ex.query for ex in data.train]))
    plan = plan_batches(cfg, len(data.train), world_size, memory)
    dims = matryoshka_dims(cfg.matryoshka_dims, model.get_embedding_dimension())
    log.info("loss %s (scale %.0f%s), global batch %d = %d x %d ranks, %d steps, Matryoshka %s", plan.loss,
             1 / cfg.temperature, f", mini-batch {plan.mini_batch}" if plan.mini_batch else "", plan.global_batch,
             plan.per_device, plan.world_size, plan.total_steps, dims or "off")
    return hw, memory, plan, dims


def _resume_point(checkpoints: Path, identity: str, dist, keep: bool) -> str | None:  # noqa: ANN001
    """The checkpoint to resume from (None: start afresh). Checkpoints of another config or input are removed
    first, and all of them when ``keep`` is false (``--force`` or ``resume=False``)."""
    if dist.is_main:
        clean_checkpoints(checkpoints, identity, keep)
    dist.barrier()
    resume_from = dist.from_main(_str_or_none(last_checkpoint(checkpoints)) if dist.is_main else None)
    if resume_from:
        log.info("resuming from %s", Path(resume_from).name)
    return resume_from


def _train(trainer, resume_from: str | None, total_steps: int) -> float:  # noqa: ANN001
    """Train (or resume); returns the seconds it took."""
    t0 = time.perf_counter()
    if resume_from and _holds_every_step(trainer, resume_from, total_steps):
        log.info("%s already holds all %d steps: finishing from it without training", Path(resume_from).name,
                 total_steps)
        return time.perf_counter() - t0
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    finally:  # a failed or interrupted training gets no on_train_end: its progress heartbeat must stop too
        close_progress(trainer)
    # Mixed precision wraps the model's forward in bf16 autocast; what follows (LoRA merge, saving, any
    # scoring of the in-memory model) runs the plain fp32 forward, as the saved model will.
    trainer.accelerator.unwrap_model(trainer.model, keep_fp32_wrapper=False)
    return time.perf_counter() - t0


def _memory_plan(memory: MemoryBudget | None, plan: BatchPlan) -> dict[str, int | None]:
    """The planner's figures for one step (a GradCache mini-batch holds activations), kept to check against."""
    examples = plan.mini_batch or plan.per_device
    return {
        "planned_activations_bytes": memory.activations(examples) if memory else None,
        "planned_peak_bytes": memory.peak_bytes(examples) if memory else None,
    }


def _check_recipe(cfg: FinetuneConfig) -> None:
    if cfg.report_to == "tensorboard" and not _tensorboard_installed():
        raise ValueError("finetune.report_to=tensorboard needs the tensorboard package: pip install tensorboard "
                         "(or set finetune.report_to=none)")
    if not cfg.in_batch_negatives:
        raise ValueError(
            "finetune.in_batch_negatives=false is not supported: sentence-transformers' ranking "
            "losses always use in-batch negatives (set it to true)"
        )


def _report_data(data: TrainingData, n: int, cfg: FinetuneConfig) -> None:
    log.info(
        "%d examples: %d for training, %d queries held out for validation (%d passages)",
        n,
        len(data.train),
        len(data.validation.queries),
        len(data.validation.corpus),
    )
    if not data.validation and cfg.validation_fraction > 0:
        log.warning("too few queries to hold out a validation set: the last checkpoint is kept, not the best")
    if data.filled_negatives:
        log.warning(
            "%d of %d training queries have fewer than %d hard negatives; filled with random passages",
            data.filled_negatives,
            len(data.train),
            data.negatives,
        )


def _evaluate_base(evaluator, model) -> tuple[float | None, str | None]:
    """Validation nDCG@10 of the untrained model, and the trainer's name for that metric."""
    if evaluator is None:
        return None, None
    scores = evaluator(model)
    key = evaluator.primary_metric
    log.info("base model validation nDCG@10: %.4f", scores[key])
    return round(float(scores[key]), 5), f"eval_{key}"


def _trainer(
    cfg: FinetuneConfig,
    plan: BatchPlan,
    hw: Hardware,
    model,
    data: TrainingData,
    evaluator,
    metric: str | None,
    checkpoints: Path,
    dims: list[int] | None,
) -> tuple[Any, Throughput]:
    from sentence_transformers import SentenceTransformerTrainer

    args = training_arguments(
        cfg, plan, hw, checkpoints, column_prompts(model, data.negatives), metric
    )
    throughput = Throughput(plan.global_batch)
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=to_dataset(data.train, data.negatives, cfg.seed, scores=LOSSES[plan.loss].needs_scores),
        loss=build_loss(model, plan, cfg.temperature, dims),
        evaluator=evaluator,
        callbacks=[throughput, PublishProgress()],
    )
    quiet_trainer(trainer, throughput)
    if cfg.report_to == "tensorboard":
        from transformers.integrations import TensorBoardCallback

        board = TensorBoardCallback()
        board.logging_dir = str(checkpoints.parent / "tensorboard")  # beside the model, not in checkpoints/
        trainer.add_callback(board)
    return trainer, throughput


def _tensorboard_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


def _finish(
    stage,
    model,
    trainer,
    cfg: FinetuneConfig,
    plan: BatchPlan,
    data: TrainingData,
    dims: list[int] | None,
    n_examples: int,
    metrics: dict[str, Any],
    metric: str | None,
    card: tuple[dict[str, Any], dict[str, Any]],
) -> Manifest:
    if cfg.finetuning_type == "lora_merged":
        merge_lora(model)
    history = trainer.state.log_history
    state = trainer.state
    metrics |= {
        "best_val_ndcg@10": round(float(state.best_metric), 5) if state.best_metric is not None else None,
        "best_step": state.best_global_step,
        "final_loss": next((h["loss"] for h in reversed(history) if "loss" in h), None),
        "matryoshka_dims": dims,
    }
    counts = {
        "examples": n_examples,
        "train_examples": len(data.train),
        "val_queries": len(data.validation.queries),
        "steps": state.global_step,
        "epochs": round(float(state.epoch or 0), 3),
        "global_batch_size": plan.global_batch,
        "per_device_batch_size": plan.per_device,
        "world_size": plan.world_size,
        "gather_across_devices": plan.world_size > 1,
        "negatives": data.negatives,
        "filled_negatives": data.filled_negatives,
        "loss": plan.loss,
    }
    base, config = card
    text = model_card(base, config, counts, metrics, stage.dir.parent.name)
    outputs = [
        _save_model(model, stage.dir / "model", dims, text),
        write_log(history, stage.dir / "train_log.jsonl"),
        plot_curves(history, metric, stage.dir / "loss_curve.png"),
        write_summary(counts, metrics, stage.dir / "summary.md"),
    ]
    log.info(
        "finetune: %d steps, %.1f examples/s, best validation nDCG@10 %s (base %s)",
        state.global_step,
        metrics["examples_per_second"],
        metrics["best_val_ndcg@10"],
        metrics["base_val_ndcg@10"],
    )
    return stage.finish(outputs=outputs, counts=counts, metrics=metrics)


def _save_model(model, target: Path, matryoshka_dims: list[int] | None, card: str | None = None) -> Path:
    """Write the model beside ``target`` and rename it into place (never a half-written model).

    ``embedtune.json`` declares the trained Matryoshka sizes, so the server accepts exactly those; ``card``
    replaces sentence-transformers' automatic README.md (written before the rename: the folder's content
    hash, which caches key on, is final once it is in place).
    """
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save(str(tmp))
    write_metadata(tmp, {"matryoshka_dims": matryoshka_dims})
    if card is not None:
        write_text(tmp / "README.md", card)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
    return target


def _str_or_none(path: Path | None) -> str | None:
    return str(path) if path is not None else None


def _step_of(checkpoint: str | None) -> int:
    return int(checkpoint.rpartition("-")[2]) if checkpoint else 0
