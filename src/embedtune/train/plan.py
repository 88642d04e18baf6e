"""Decisions made before training: batch sizes, steps, Matryoshka dims, precision/optimizer by hardware."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
class MemoryBudget:
    """What one training text costs in activations, and how much memory activations may take."""

    bytes_per_text: int  # one passage at the model's max length, forward kept for backward
    texts_per_example: int  # positive + hard negatives (queries are short)
    available: int  # bytes activations may take (free memory minus weights, gradients, optimizer)

    def examples_that_fit(self) -> int:
        return max(1, self.available // (self.bytes_per_text * self.texts_per_example))


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
        global_batch, scaled = max(16, min(64, n_train // 8)), True
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


def _gb(memory: MemoryBudget, examples: int) -> float:
    return examples * memory.texts_per_example * memory.bytes_per_text / 1e9


def activation_bytes(seq_len: int, hidden: int, heads: int, layers: int, bytes_per_value: int = 4) -> int:
    """Activations one sequence keeps for backward through a transformer encoder.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count
    ``s*h*(34 + 5*a*s/h)`` bytes per layer at 2 bytes a value. Checked here: it predicts ~31 GB for
    multilingual-e5-small at 512 tokens, batch 29 x 2 passages, which the kernel killed on a 24 GB machine,
    and ~11 GB for MiniLM-L6 at 256 tokens, batch 64 x 2 passages, which trained.
    """
    return int(layers * seq_len * hidden * (34 + 5 * heads * seq_len / hidden) * bytes_per_value / 2)


def memory_budget(model, texts_per_example: int, hw: Hardware, share: float = 0.7,
                  world_size: int = 1) -> MemoryBudget | None:
    """The budget for ``model`` (a SentenceTransformer) on this machine; None when its transformer config
    does not say its shape. ``share`` of free memory is allowed, less weights, gradients and AdamW state;
    on CPU the ranks of one machine share its RAM, so each gets ``1 / world_size`` of it. Call it after LoRA
    adapters are added, so that only they are charged optimizer state."""
    config = getattr(getattr(model[0], "auto_model", None), "config", None)
    shape = [getattr(config, k, None) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers")]
    if config is None or None in shape or not model.max_seq_length:
        return None
    per_text = activation_bytes(int(model.max_seq_length), *shape, bytes_per_value=2 if hw.bf16 else 4)
    free = free_memory(hw) // (1 if hw.cuda else world_size)
    return MemoryBudget(per_text, texts_per_example, max(0, int(free * share) - parameter_state_bytes(model)))


def parameter_state_bytes(model) -> int:
    """fp32 weight, gradient and AdamW's two moments (16 B) per trained parameter; a frozen one keeps its weight
    only (4 B). With LoRA the frozen base dominates: 135M params train ~5M adapters, ~0.6 GB instead of 2.2 GB."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return 16 * trained + 4 * frozen


def free_memory(hw: Hardware) -> int:
    """Bytes free on the training device: the GPU's free memory under CUDA, else available RAM."""
    if hw.cuda:
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


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


def _check_loss(name: str) -> None:
    from embedtune.train.losses import LOSSES

    if name != "auto" and name not in LOSSES:
        raise ValueError(f"finetune.loss: unknown loss {name!r}; one of: auto, {', '.join(LOSSES)}")
