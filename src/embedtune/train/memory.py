"""What training will cost in memory: activations per text (encoders by formula, Llama-style decoders tensor by
tensor), weights, gradients and optimizer state, and the budget the batch plan must fit."""

from __future__ import annotations

from dataclasses import dataclass

from embedtune.train import machine
from embedtune.train.dropout import attention_dropout_layers, rate_slot
from embedtune.train.machine import Hardware


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
    free = machine.free_memory(hw) // (1 if hw.cuda else world_size)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return MemoryBudget(per_text(seq), texts_per_example, max(0, int(free * share) - parameter_state_bytes(model)),
                        resident=machine.resident_memory(hw), optimizer=12 * trained, bytes_per_query=per_query)


def keeps_attention_scores(auto_model) -> bool:
    """Whether backward keeps the (heads x seq x seq) attention probabilities: eager attention does, and so does
    SDPA with dropout (no fused kernel applies); fused SDPA without dropout does not."""
    config = getattr(auto_model, "config", None)
    if getattr(config, "_attn_implementation", "eager") == "eager":
        return True
    return any(getattr(*rate_slot(m, attr)) > 0 for m, attr in attention_dropout_layers(auto_model))


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
