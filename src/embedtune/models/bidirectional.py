"""Decoder backbones (Llama, Mistral, Qwen...) as bidirectional encoders with mean pooling.

NVIDIA's llama-nemotron-embed models are Llama decoders whose attention is *not* causal: every token sees
every other token, and the sentence vector is the mean of the token states. transformers (>= 5.2) supports
exactly this through one config attribute: with ``config.is_causal = False``, ``create_causal_mask`` builds a
bidirectional (padding-only) mask, and ``merge_with_config_defaults`` passes ``is_causal=False`` down to the
attention interface, so SDPA does not fall back to its own causal flag when the mask is skipped.

The attribute is written into ``config.json`` by ``save_pretrained``, so a saved folder reloads bidirectional
with a plain ``SentenceTransformer(path)`` — no custom module, no ``trust_remote_code``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedtune.console import log

if TYPE_CHECKING:
    import torch
    from sentence_transformers import SentenceTransformer

    from embedtune.models import ModelSpec

# The prompts of NVIDIA's llama-nemotron-embed family (and of E5-style bidirectional encoders).
QUERY_PROMPT, PASSAGE_PROMPT = "query: ", "passage: "
TEXT_ONLY = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}


def load_bidirectional(spec: ModelSpec, device: str | None = None) -> SentenceTransformer:
    """A plain transformers decoder folder -> SentenceTransformer: non-causal attention, mean pooling."""
    from sentence_transformers import SentenceTransformer, models

    word = models.Transformer(
        spec.path,
        max_seq_length=spec.max_seq_length,
        config_kwargs={"is_causal": False},
        processor_kwargs={"padding_side": "right"},
        # Text in, token states out. An instruct checkpoint's tokenizer carries a chat template, and with one
        # sentence-transformers renders every text as a chat turn (system prompt included): an embedder wants
        # the text alone, as the ONNX export and every other encoder tokenise it.
        modality_config=TEXT_ONLY,
        module_output_name="token_embeddings",
    )
    word.tokenizer.chat_template = None  # not saved with the model either, so a reload stays text-only
    _ensure_pad_token(word.tokenizer)
    make_bidirectional(word.auto_model)
    pooling = models.Pooling(word.get_embedding_dimension(), pooling_mode=spec.pooling or "mean")
    st = SentenceTransformer(modules=[word, pooling, models.Normalize()], device=device)
    st.prompts = {
        "query": spec.query_prompt or QUERY_PROMPT,
        "document": spec.passage_prompt or PASSAGE_PROMPT,
    }
    return st


def make_bidirectional(model: torch.nn.Module) -> None:
    """Switch a loaded decoder to bidirectional attention (in memory and in the config it will save)."""
    config = model.config
    config.is_causal = False
    if hasattr(config, "use_cache"):
        config.use_cache = False  # no KV cache for an encoder; also keeps the mask purely bidirectional
    for module in model.modules():
        # The attention modules' own flag is only a fallback, but keep it consistent for other kernels.
        if hasattr(module, "is_causal") and isinstance(module.is_causal, bool):
            module.is_causal = False


def _ensure_pad_token(tokenizer) -> None:
    # Llama tokenizers ship without a pad token; batching needs one (mean pooling ignores padded positions).
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        log.debug("tokenizer had no pad token; using %r", tokenizer.pad_token)
