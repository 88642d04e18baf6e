"""Decisions made before training: batch sizes, steps, Matryoshka dims, precision/optimizer by hardware."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from embedtune.config import FinetuneConfig
from embedtune.console import log

# NVIDIA's recipe scales the batch down below this many examples: max(16, min(64, N // 8)).
SMALL_DATA = 2000
FEW_STEPS = 50
# Matryoshka ladder: sizes users actually truncate to (nemotron-embed offers 384..2048; MiniLM-class 64..384).
MATRYOSHKA_LADDER = (4096, 3072, 2048, 1024, 768, 512, 384, 256, 128, 64)
# Smallest truncation worth training for, relative to the full size (2048 -> 384, 384 -> 64).
MATRYOSHKA_MIN_FRACTION = 1 / 6
MATRYOSHKA_MIN_DIM = 64


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    per_device: int
    world_size: int
    mini_batch: int | None  # GradCache mini-batch when the cached loss is used
    loss: Literal["mnrl", "cached_mnrl", "margin_mse"]
    steps_per_epoch: int
    total_steps: int
    scaled: bool


def plan_batches(cfg: FinetuneConfig, n_train: int, world_size: int = 1) -> BatchPlan:
    """Global/per-device batch, loss kind and step count; warns when training will be very short."""
    global_batch, scaled = cfg.global_batch_size, False
    if cfg.auto_scale_batch and n_train < SMALL_DATA:
        global_batch, scaled = max(16, min(64, n_train // 8)), True
    global_batch = max(world_size, min(global_batch, n_train))  # a batch larger than the data is one batch
    per_device = math.ceil(global_batch / world_size)
    global_batch = per_device * world_size
    mini = cfg.micro_batch_size
    kind = cfg.loss
    if kind == "auto":
        kind = "cached_mnrl" if mini is not None and mini < per_device else "mnrl"
    if kind == "cached_mnrl" and mini is None:
        mini = min(32, per_device)
    steps_per_epoch = math.ceil(n_train / global_batch)
    total = cfg.max_steps or math.ceil(steps_per_epoch * cfg.epochs)
    if scaled and global_batch != cfg.global_batch_size:
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


def matryoshka_dims(setting: list[int] | str | None, dim: int) -> list[int] | None:
    """The truncation sizes MatryoshkaLoss trains, largest first; None means plain training.

    ``auto``: the full size plus the ladder sizes below it down to max(64, dim/6), e.g. 384 -> 384/256/128/64,
    768 -> 768/512/384/256/128, 2048 -> 2048/1024/768/512/384. Models below 128 dims (tiny test models)
    get None: there is nothing worth truncating to.
    """
    if setting is None:
        return None
    if setting == "auto":
        floor = max(MATRYOSHKA_MIN_DIM, dim * MATRYOSHKA_MIN_FRACTION)
        dims = [dim] + [d for d in MATRYOSHKA_LADDER if floor <= d < dim]
        return dims if len(dims) > 1 else None
    bad = [d for d in setting if d > dim or d < 1]
    if bad:
        raise ValueError(f"finetune.matryoshka_dims {bad} outside 1..{dim} (the model's embedding size)")
    dims = sorted(set(setting) | {dim}, reverse=True)
    return dims if len(dims) > 1 else None


@dataclass(frozen=True)
class Hardware:
    cuda: bool
    bf16: bool
    tf32: bool
    optim: str


def hardware() -> Hardware:
    """bf16, tf32 and fused AdamW only where CUDA supports them; plain fp32 AdamW on CPU."""
    import torch

    if not torch.cuda.is_available():
        log.info(
            "no CUDA device: training in fp32 on CPU with torch AdamW (bf16/tf32/fused AdamW are GPU-only)"
        )
        return Hardware(False, False, False, "adamw_torch")
    bf16 = torch.cuda.is_bf16_supported()
    tf32 = torch.cuda.get_device_capability()[0] >= 8
    log.info("CUDA: bf16=%s tf32=%s, fused AdamW", bf16, tf32)
    return Hardware(True, bf16, tf32, "adamw_torch_fused")
