"""The batch plan: global and per-device batch, GradCache mini-batches where memory asks for them, the loss
and the step count, a small function of (data size, machine's memory budget, recipe)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from embedtune.config import FinetuneConfig
from embedtune.console import log
from embedtune.train.losses import LOSSES
from embedtune.train.memory import MemoryBudget

# NVIDIA's recipe scales the batch down below this many examples: max(16, min(64, N // 8)).
SMALL_DATA = 2000
FEW_STEPS = 50


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    per_device: int
    world_size: int
    mini_batch: int | None  # GradCache mini-batch when the cached loss is used
    loss: str  # a name in embedtune.train.losses.LOSSES
    steps_per_epoch: int
    total_steps: int
    scaled: bool


def plan_batches(cfg: FinetuneConfig, n_train: int, world_size: int = 1,
                 memory: MemoryBudget | None = None) -> BatchPlan:
    """Global/per-device batch, loss kind and step count; warns when training will be very short.

    With ``memory``, a per-device batch whose activations would not fit is split into GradCache
    mini-batches (``loss: auto``) instead of being killed by the kernel's OOM killer mid-epoch.
    """
    global_batch, scaled = cfg.global_batch_size, False
    if cfg.auto_scale_batch and n_train < SMALL_DATA:
        # Only ever down: a recipe that asks for a smaller batch (more steps on little data) gets it.
        global_batch = min(global_batch, max(16, min(64, n_train // 8)))
        scaled = global_batch != cfg.global_batch_size
    global_batch = max(world_size, min(global_batch, n_train))  # a batch larger than the data is one batch
    per_device = math.ceil(global_batch / world_size)
    global_batch = per_device * world_size
    mini = cfg.micro_batch_size
    kind = cfg.loss
    _check_loss(kind)
    if memory is not None and mini is None and per_device > (fits := memory.examples_that_fit()):
        if kind == "auto":  # GradCache: the same batch (same negatives, same gradient) in pieces that fit
            mini = fits
            log.warning("a per-device batch of %d needs ~%.1f GB of activations, %.1f GB are free: GradCache "
                        "(cached_mnrl) in mini-batches of %d", per_device, _gb(memory, per_device),
                        memory.available / 1e9, mini)
        else:
            log.warning("a per-device batch of %d needs ~%.1f GB of activations, %.1f GB are free: it may run "
                        "out of memory (set finetune.micro_batch_size, or loss: auto)", per_device,
                        _gb(memory, per_device), memory.available / 1e9)
    if kind == "auto":
        kind = "cached_mnrl" if mini is not None and mini < per_device else "mnrl"
    if kind == "cached_mnrl" and mini is None:
        mini = min(32, per_device)
    steps_per_epoch = math.ceil(n_train / global_batch)
    total = cfg.max_steps or math.ceil(steps_per_epoch * cfg.epochs)
    if scaled:
        log.info(
            "small data (%d examples < %d): global batch %d -> %d",
            n_train,
            SMALL_DATA,
            cfg.global_batch_size,
            global_batch,
        )
    if total < FEW_STEPS:
        log.warning(
            "only %d optimizer steps (%d per epoch): the model will barely move; more data or epochs "
            "would help",
            total,
            steps_per_epoch,
        )
    return BatchPlan(
        global_batch,
        per_device,
        world_size,
        mini if kind == "cached_mnrl" else None,
        kind,
        steps_per_epoch,
        total,
        scaled,
    )


def _gb(memory: MemoryBudget, examples: int) -> float:
    return memory.activations(examples) / 1e9


def _check_loss(name: str) -> None:
    if name != "auto" and name not in LOSSES:
        raise ValueError(f"finetune.loss: unknown loss {name!r}; one of: auto, {', '.join(LOSSES)}")
