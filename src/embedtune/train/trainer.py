"""sentence-transformers' trainer, set up for the recipe: arguments, evaluator, checkpoints, throughput."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from embedtune.config import FinetuneConfig
from embedtune.console import log
from embedtune.train.data import Validation
from embedtune.train.machine import Hardware
from embedtune.train.plan import BatchPlan

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

VAL_NAME = "val"
STATE_FILE = "trainer_state.json"


def build_evaluator(
    val: Validation, model: SentenceTransformer, batch_size: int
) -> InformationRetrievalEvaluator:
    from sentence_transformers.sentence_transformer.evaluation import InformationRetrievalEvaluator

    prompts = model.prompts or {}
    return InformationRetrievalEvaluator(
        val.queries,
        val.corpus,
        val.relevant,
        name=VAL_NAME,
        batch_size=batch_size,
        ndcg_at_k=[10],
        mrr_at_k=[10],
        map_at_k=[10],
        accuracy_at_k=[1, 5, 10],
        precision_recall_at_k=[1, 5, 10],
        query_prompt=prompts.get("query") or None,
        corpus_prompt=prompts.get("document") or None,
        write_csv=False,
        show_progress_bar=False,
    )


def column_prompts(model: SentenceTransformer, negatives: int) -> dict[str, str] | None:
    """The model's query prompt for the anchor, its passage prompt for positive and negatives."""
    prompts = model.prompts or {}
    query, passage = prompts.get("query", ""), prompts.get("document", "")
    mapping = {
        "anchor": query,
        "positive": passage,
        **{f"negative_{i}": passage for i in range(1, negatives + 1)},
    }
    mapping = {k: v for k, v in mapping.items() if v}
    return mapping or None


def training_arguments(
    cfg: FinetuneConfig,
    plan: BatchPlan,
    hw: Hardware,
    out: Path,
    prompts: dict | None,
    best_metric: str | None,
) -> Any:
    from sentence_transformers import SentenceTransformerTrainingArguments
    from sentence_transformers.base.sampler import BatchSamplers

    eval_steps = cfg.eval_steps or cfg.checkpoint_steps
    if best_metric and cfg.checkpoint_steps % eval_steps:
        raise ValueError(
            f"finetune.checkpoint_steps ({cfg.checkpoint_steps}) must be a multiple of "
            f"finetune.eval_steps ({eval_steps}) so the best checkpoint can be kept"
        )
    return SentenceTransformerTrainingArguments(
        output_dir=str(out),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=plan.per_device,
        per_device_eval_batch_size=plan.per_device,
        learning_rate=cfg.learning_rate,
        warmup_steps=cfg.warmup_steps,
        lr_scheduler_type=cfg.lr_scheduler,
        weight_decay=cfg.weight_decay,
        optim=hw.optim,
        bf16=hw.bf16,
        tf32=hw.tf32 or None,
        use_cpu=not hw.cuda,
        ddp_backend=None if hw.cuda or plan.world_size == 1 else "gloo",
        batch_sampler=BatchSamplers.NO_DUPLICATES,
        prompts=prompts,
        eval_strategy="steps" if best_metric else "no",
        eval_steps=eval_steps if best_metric else None,
        save_strategy="steps",
        save_steps=cfg.checkpoint_steps,
        save_total_limit=cfg.save_total_limit,
        load_best_model_at_end=bool(best_metric),
        metric_for_best_model=best_metric,
        greater_is_better=True if best_metric else None,
        logging_steps=max(1, min(10, plan.total_steps // 20)),
        logging_first_step=True,
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        dataloader_num_workers=0,
        disable_tqdm=True,  # StepProgress reports instead (a bar on a terminal, plain lines in a log)
    )


class Throughput(TrainerCallback):
    """Examples/s over optimizer steps only (evaluation and checkpoint writes excluded), logged."""

    def __init__(self, global_batch: int):
        self.global_batch = global_batch
        self.steps = 0
        self.seconds = 0.0
        self._t0: float | None = None

    @property
    def examples_per_second(self) -> float:
        return self.steps * self.global_batch / self.seconds if self.seconds else 0.0

    def on_step_begin(self, args, state, control, **kw):
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self.steps += 1

    def on_log(self, args, state, control, logs=None, **kw):
        if logs is not None and "loss" in logs and self.seconds:
            logs["examples_per_second"] = round(self.examples_per_second, 2)
            if state.is_world_process_zero:  # StepProgress shows loss and rate; this is the per-step record
                log.debug(
                    "step %d/%d  loss %.4f  %.1f examples/s",
                    state.global_step,
                    state.max_steps,
                    float(logs["loss"]),
                    self.examples_per_second,
                )


class StepProgress(TrainerCallback):
    """Optimizer steps on embedtune's progress display: a rich bar on a terminal, else one plain line about
    every 10 s (steps done/total, rate, elapsed, ETA, the last logged loss and examples/s). It replaces
    transformers' tqdm bar (``\r`` redraws in a log file) and the printed log dicts (see :func:`quiet_trainer`)."""

    def __init__(self, throughput: Throughput | None = None):
        self.throughput = throughput
        self._bar: Any = None
        self._task: Any = None
        self._first = 0

    def on_train_begin(self, args, state, control, **kw):
        if not state.is_world_process_zero:
            return
        from embedtune.console import progress

        self._first = state.global_step  # a resumed run counts the steps it still has to do
        label = f"training (resumed at step {self._first})" if self._first else "training"
        self._bar = progress()
        self._bar.start()
        self._task = self._bar.add_task(label, total=max(state.max_steps - self._first, 0), unit="steps")

    def on_step_end(self, args, state, control, **kw):
        if self._bar is not None:
            self._bar.update(self._task, completed=state.global_step - self._first)

    def on_log(self, args, state, control, logs=None, **kw):
        if self._bar is not None and logs and "loss" in logs:
            rate = f", {self.throughput.examples_per_second:.1f} examples/s" if self.throughput else ""
            self._bar.update(self._task, description=f"training (loss {float(logs['loss']):.4f}{rate})")

    def on_train_end(self, args, state, control, **kw):
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class PublishProgress(TrainerCallback):
    """Steps, epochs and logged losses as :mod:`embedtune.events` (the platform worker records them on its
    job; nothing happens when nobody listens)."""

    @staticmethod
    def _publish(kind, args, state, logs=None) -> None:  # noqa: ANN001 - transformers' types
        from embedtune.events import TrainingEvent, publish

        if state.is_world_process_zero:
            numbers = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, int | float)}
            publish(TrainingEvent(kind, state.global_step, state.max_steps, float(state.epoch or 0.0),
                                  float(args.num_train_epochs or 0.0), numbers))

    def on_train_begin(self, args, state, control, **kw):
        self._publish("begin", args, state)

    def on_step_end(self, args, state, control, **kw):
        self._publish("step", args, state)

    def on_log(self, args, state, control, logs=None, **kw):
        self._publish("log", args, state, logs)


def close_progress(trainer: Any) -> None:
    """Stop the trainer's StepProgress display (after an exception, transformers calls no on_train_end)."""
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, StepProgress):
            callback.close()


def quiet_trainer(trainer: Any, throughput: Throughput | None = None) -> None:
    """Swap transformers' progress reporting (tqdm bar, or print() of every log dict) for StepProgress."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(StepProgress(throughput))


# ------------------------------------------------------------------------------------------ checkpoints


def last_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose trainer state was written completely (kill -9 can leave half a folder)."""
    if not folder.is_dir():
        return None
    found = []
    for path in folder.glob("checkpoint-*"):
        step = path.name.rpartition("-")[2]
        if step.isdigit() and _complete(path):
            found.append((int(step), path))
    return max(found)[1] if found else None


def clean_checkpoints(folder: Path, fingerprint: str, resume: bool) -> None:
    """Drop checkpoints of a different config/input (or all, without resume) and incomplete ones (rank 0)."""
    marker = folder / "fingerprint.txt"
    stale = folder.is_dir() and (
        not resume or not marker.is_file() or marker.read_text().strip() != fingerprint
    )
    if stale:
        if any(folder.glob("checkpoint-*")):
            log.info(
                "discarding checkpoints in %s (%s)",
                folder,
                "--no-resume/--force" if not resume else "config or input changed",
            )
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    marker.write_text(fingerprint + "\n")
    for path in folder.glob("checkpoint-*"):
        if not _complete(path):
            log.info("removing incomplete checkpoint %s", path.name)
            shutil.rmtree(path)


def _complete(path: Path) -> bool:
    try:
        json.loads((path / STATE_FILE).read_text())
        return True
    except (OSError, ValueError):
        return False
