"""Decisions made before training: batch sizes, steps, Matryoshka dims, precision/optimizer by hardware."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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
    texts_per_example: int  # positive + hard negatives
    available: int  # bytes activations may take (free memory minus weights, gradients, optimizer)
    resident: int = 0  # bytes the training process holds when planning: runtime, loaded weights (and adapters)
    optimizer: int = 0  # gradients and AdamW's two moments of the trained parameters, allocated at the first step
    bytes_per_query: int = 0  # one query at its typical tokenized length (0: not known, not counted)

    def bytes_per_example(self) -> int:
        return self.bytes_per_text * self.texts_per_example + self.bytes_per_query

    def examples_that_fit(self) -> int:
        return max(1, self.available // self.bytes_per_example())

    def activations(self, examples: int) -> int:
        return examples * self.bytes_per_example()

    def peak_bytes(self, examples: int) -> int:
        """The training process's expected peak: what it holds now, the optimizer state, the batch's activations."""
        return self.resident + self.optimizer + self.activations(examples)


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
    return memory.activations(examples) / 1e9


def activation_bytes(seq_len: int, hidden: int, heads: int, layers: int, bytes_per_value: float = 4,
                     attention_scores: bool = True) -> int:
    """Activations one sequence keeps for backward through a transformer encoder.

    Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models") count
    ``s*h*(34 + 5*a*s/h)`` bytes per layer at 2 bytes a value. Checked here: it predicts ~31 GB for
    multilingual-e5-small at 512 tokens, batch 29 x 2 passages, which the kernel killed on a 24 GB machine,
    and ~11 GB for MiniLM-L6 at 256 tokens, batch 64 x 2 passages, which trained. The ``5*a*s/h`` term is the
    attention probabilities and their dropout mask; fused attention without dropout keeps neither
    (``attention_scores=False``): MiniLM at 256 tokens then measured 0.51x the activations, the formula says 0.46x.
    """
    per_token = 34 + (5 * heads * seq_len / hidden if attention_scores else 0)
    return int(layers * seq_len * hidden * per_token * bytes_per_value / 2)


def memory_budget(model, texts_per_example: int, hw: Hardware, share: float = 0.7,
                  world_size: int = 1, query_tokens: int | None = None) -> MemoryBudget | None:
    """The budget for ``model`` (a SentenceTransformer) on this machine; None when its transformer config
    does not say its shape. ``share`` of free memory is allowed, less weights, gradients and AdamW state;
    on CPU the ranks of one machine share its RAM, so each gets ``1 / world_size`` of it. Call it after LoRA
    adapters are added, so that only they are charged optimizer state. ``query_tokens`` (see
    :func:`typical_query_tokens`) counts each example's query too: passages run to the max length, queries
    rarely do, but with 96-token passages a 21-token query is still a tenth of the activations."""
    auto_model = getattr(model[0], "auto_model", None)
    config = getattr(auto_model, "config", None)
    shape = [getattr(config, k, None) for k in ("hidden_size", "num_attention_heads", "num_hidden_layers")]
    if config is None or None in shape or not model.max_seq_length:
        return None
    # CPU autocast keeps norms, softmax and residual sums in fp32: MiniLM measured 0.68-0.80x its fp32
    # activations, not 0.5x, so it is counted at 3 bytes a value.
    value = (2 if hw.cuda else 3) if hw.bf16 else 4
    scores = keeps_attention_scores(auto_model)

    def per_text(seq: int) -> int:
        return (decoder_activation_bytes(auto_model, seq, value)
                or activation_bytes(seq, *shape, bytes_per_value=value, attention_scores=scores))

    seq = int(model.max_seq_length)
    per_query = per_text(min(query_tokens, seq)) if query_tokens else 0
    free = free_memory(hw) // (1 if hw.cuda else world_size)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return MemoryBudget(per_text(seq), texts_per_example, max(0, int(free * share) - parameter_state_bytes(model)),
                        resident=resident_memory(hw), optimizer=12 * trained, bytes_per_query=per_query)


def attention_dropout_layers(model) -> list[tuple[Any, str]]:
    """(module, attribute) of every attention-probability dropout: BERT-family self-attention's ``dropout``
    (an ``nn.Dropout``) and the ``attention_dropout`` float of Llama-style attention."""
    import torch

    found = []
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            found.append((module, "attention_dropout"))
        elif type(module).__name__.endswith("SelfAttention") and isinstance(getattr(module, "dropout", None),
                                                                              torch.nn.Dropout):
            found.append((module, "dropout"))
    return found


def set_attention_dropout(model, p: float) -> int:
    """Sets the attention-probability dropout of ``model``'s live modules (its saved config is left as it was);
    returns how many layers it changed."""
    layers = attention_dropout_layers(model)
    for module, attr in layers:
        setattr(*_rate_slot(module, attr), p)
    return len(layers)


def _rate_slot(module, attr: str) -> tuple[Any, str]:
    """Where a layer found by :func:`attention_dropout_layers` keeps its rate: the Dropout's ``p``, or the float."""
    return (module.dropout, "p") if attr == "dropout" else (module, attr)


def keeps_attention_scores(auto_model) -> bool:
    """Whether backward keeps the (heads x seq x seq) attention probabilities: eager attention does, and so does
    SDPA with dropout (no fused kernel applies); fused SDPA without dropout does not."""
    config = getattr(auto_model, "config", None)
    if getattr(config, "_attn_implementation", "eager") == "eager":
        return True
    return any(getattr(*_rate_slot(m, attr)) > 0 for m, attr in attention_dropout_layers(auto_model))


def typical_query_tokens(model, queries: list[str], sample: int = 1000) -> int | None:
    """The 95th percentile of the training queries' tokenized length (query prompt included, at most the model's
    max length): a batch pads its queries to its longest, so a high percentile, not the mean. None without a
    tokenizer."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None or not queries:
        return None
    prompt = (getattr(model, "prompts", None) or {}).get("query", "")
    picked = queries[:: max(1, len(queries) // sample)][:sample]
    lengths = sorted(len(ids) for ids in tokenizer([prompt + q for q in picked])["input_ids"])
    return min(lengths[int(0.95 * (len(lengths) - 1))], int(model.max_seq_length or lengths[-1]))


def decoder_activation_bytes(auto_model, seq_len: int, bytes_per_value: int = 4) -> int | None:
    """Activations one sequence of ``seq_len`` tokens keeps for backward through a Llama-style decoder (RMSNorm,
    gated SiLU MLP, grouped-query attention), counted tensor by tensor from its config and what trains; None for
    other architectures (the encoder formula above applies to them).

    Per token and layer, in values (h hidden, i MLP intermediate, n query heads, g key/value heads, d head size):

    - the two RMSNorms keep their input (h each), and their output too when their weight trains;
    - SiLU keeps the gate projection's output, the product keeps SiLU's output and the up projection's (3i);
    - SDPA keeps q, its output (n*d each), k and v (g*d each; grouped, not repeated) and a log-sum-exp per head.
      Eager attention keeps q and the repeated k and v (n*d each), the softmax's probabilities (n*s, the one term
      that grows with the sequence) and a contiguous copy of its output for o_proj;
    - a linear layer whose weight trains keeps its input (shared by q/k/v and by gate/up). A frozen one keeps
      nothing: the gradient to its input needs only the weight. A LoRA adapter keeps its A output (rank r) and,
      with dropout, its own dropped copy of the input plus the float mask (2 x in): so LoRA with dropout keeps
      *more* than a full fine-tune (SmolLM2-135M: ~17.4k values per token and layer against ~11.2k);
    - per sequence, the final norm's input and the pooled token states (2h); with frozen embeddings, less what
      the first layer need not keep (its first norm's input, its q/k/v dropout masks).

    Checked against the tensors autograd actually saves (tests/test_train_plan.py, SmolLM2-135M within 1 %).
    """
    config = getattr(auto_model, "config", None)
    layers = getattr(getattr(auto_model, "get_base_model", lambda: auto_model)(), "layers", None)
    if config is None or not layers or not hasattr(layers[0], "mlp") or not hasattr(layers[0], "self_attn"):
        return None
    block = layers[0]
    h, i = config.hidden_size, config.intermediate_size
    n = config.num_attention_heads
    g = getattr(config, "num_key_value_heads", None) or n
    d = getattr(config, "head_dim", None) or h // n
    eager = getattr(config, "_attn_implementation", "eager") == "eager"
    attn, mlp = block.self_attn, block.mlp
    norms = sum(h * (2 if _trains(norm) else 1) for norm in (block.input_layernorm, block.post_attention_layernorm))
    values = norms + 3 * i + (3 * n * d + n * seq_len if eager else 2 * n * d + 2 * g * d + n)
    groups = [(h, [attn.q_proj, attn.k_proj, attn.v_proj]), (n * d, [attn.o_proj]),
              (h, [mlp.gate_proj, mlp.up_proj]), (i, [mlp.down_proj])]
    for width, linears in groups:
        keeps_input = False
        for linear in linears:
            base_trains, adapters = _linear_training(linear)
            keeps_input |= base_trains or any(not dropout for _, _, dropout in adapters)
            values += sum(rank + (2 * width if dropout else 0) for _, rank, dropout in adapters)
        if keeps_input and not (linears[0] is attn.o_proj and not eager):  # SDPA's output is o_proj's input
            values += width
    return (config.num_hidden_layers * values + 2 * h - _frozen_input_savings(auto_model, block, h)) * seq_len \
        * bytes_per_value


def _frozen_input_savings(auto_model, block, hidden: int) -> int:
    """With frozen embeddings nothing before the first layer needs a gradient: its first norm keeps no input and
    its q/k/v adapters' dropout keeps no mask (values per token, counted once, not per layer)."""
    embeddings = auto_model.get_input_embeddings() if hasattr(auto_model, "get_input_embeddings") else None
    if embeddings is None or _trains(embeddings):
        return 0
    attn = block.self_attn
    masks = sum(dropout for linear in (attn.q_proj, attn.k_proj, attn.v_proj)
                for _, _, dropout in _linear_training(linear)[1])
    return hidden * (1 + masks)


def _trains(module) -> bool:
    weight = getattr(module, "weight", None)
    return weight is not None and weight.requires_grad


def _linear_training(linear) -> tuple[bool, list[tuple[int, int, bool]]]:
    """Whether a linear layer's own weight trains, and its trained LoRA adapters as (in, rank, has dropout)."""
    base = getattr(linear, "base_layer", linear)
    adapters = []
    for name, lora_a in getattr(linear, "lora_A", {}).items():
        if lora_a.weight.requires_grad:
            dropout = getattr(linear.lora_dropout[name], "p", 0.0)
            adapters.append((lora_a.in_features, lora_a.out_features, dropout > 0))
    return _trains(base), adapters


def parameter_state_bytes(model) -> int:
    """fp32 weight, gradient and AdamW's two moments (16 B) per trained parameter; a frozen one keeps its weight
    only (4 B). With LoRA the frozen base dominates: 135M params train ~5M adapters, ~0.6 GB instead of 2.2 GB."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return 16 * trained + 4 * frozen


def resident_memory(hw: Hardware) -> int:
    """Bytes the training process holds now: its resident set on CPU, what torch has allocated under CUDA."""
    if hw.cuda:
        import torch

        return int(torch.cuda.memory_allocated())
    import psutil

    return int(psutil.Process().memory_info().rss)


# glibc's mallopt parameter, and the size from which it maps blocks straight from the kernel (its own default start).
M_MMAP_THRESHOLD, MMAP_THRESHOLD = -3, 128 * 1024


def return_freed_tensors_to_the_os() -> bool:
    """Have glibc give freed tensors' memory back to the kernel at once (Linux, CPU training).

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MB), after which a forward pass's
    freed temporaries (projections before reshapes, rotary halves, attention scratch) stay in its heap: on the
    SmolLM2-135M LoRA fine-tune that was ~1.5 GB of peak RSS beyond the live tensors (6.3 GB against 4.8 GB with
    the threshold fixed at glibc's own 128 KiB start, and no slower). Fixing the threshold keeps the measured peak
    close to what the planner counts. A no-op (False) where libc is not glibc.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


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


def hardware(cpu_bf16: bool | None = None) -> Hardware:
    """bf16, tf32 and fused AdamW where CUDA supports them. On a CPU, torch AdamW, with bf16 autocast where the CPU
    multiplies bf16 natively (``cpu_bf16=None``) or where the settings ask for it."""
    import torch

    if not torch.cuda.is_available():
        native = cpu_has_native_bf16()
        bf16 = native if cpu_bf16 is None else cpu_bf16
        if bf16 and not native:
            log.warning("finetune.cpu_bf16: this CPU has no native bf16 (AVX512-BF16/AMX); bf16 is emulated, slower")
        log.info("no CUDA device: training on CPU in %s with torch AdamW",
                 "bf16 mixed precision" if bf16 else "fp32")
        return Hardware(False, bf16, False, "adamw_torch")
    bf16 = torch.cuda.is_bf16_supported()
    tf32 = torch.cuda.get_device_capability()[0] >= 8
    log.info("CUDA: bf16=%s tf32=%s, fused AdamW", bf16, tf32)
    return Hardware(True, bf16, tf32, "adamw_torch_fused")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: oneDNN then runs bf16 matmuls natively; MiniLM training steps measured 1.6-1.7x fp32
    (bench/train_throughput.py, 2 cores). Without them bf16 is emulated and slower than fp32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")  # private but stable since torch 2.3
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def _check_loss(name: str) -> None:
    from embedtune.train.losses import LOSSES

    if name != "auto" and name not in LOSSES:
        raise ValueError(f"finetune.loss: unknown loss {name!r}; one of: auto, {', '.join(LOSSES)}")
