"""The exported graph: encoder + the model's own pooling + L2 norm + Matryoshka truncation, in ONNX.

Everything a server needs besides the tokenizer lives inside ``model.onnx``: the sentence-transformers
modules after the encoder (Pooling, Dense, Normalize) are traced as they are, so the graph pools exactly
as the PyTorch model does (mean, cls, last-token, ...), then normalises, keeps the first ``dimensions``
values and normalises again.

Exporter choice: torch 2.13 defaults to ``dynamo=True`` (torch.export), which needs the ``onnxscript``
package (not installed here) and, on Hugging Face encoders, trips over data-dependent guards in the mask
utilities unless every dynamic dimension is hinted. The TorchScript tracer (``dynamo=False``) is still
shipped, exports opset 17 directly with ``dynamic_axes`` and traces these models reliably; the parity
check on varied batch sizes and lengths proves after every export that the trace generalised.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual alias

from embedtune.console import log
from embedtune.models.spec import DECODER_TYPES

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

OUTPUT_NAME = "embeddings"


@dataclass(frozen=True)
class GraphSpec:
    """What the traced graph looks like from the outside."""

    inputs: list[str]
    dimension: int
    pooling: str
    bidirectional: bool


class EmbeddingGraph(torch.nn.Module):
    """Wraps a SentenceTransformer so one call maps token ids to final, normalised embeddings."""

    def __init__(self, model: SentenceTransformer, uses_token_type_ids: bool, bidirectional: bool):
        super().__init__()
        self.encoder = model[0]
        self.heads = torch.nn.ModuleList(list(model)[1:])
        self.uses_token_type_ids = uses_token_type_ids
        self.bidirectional = bidirectional

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        token_type_ids, dimensions = rest if self.uses_token_type_ids else (None, rest[0])
        features: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None:
            features["token_type_ids"] = token_type_ids
        if self.bidirectional:
            # A ready 4D mask is used as-is by transformers' mask utilities, so every token attends to
            # every non-padding token: the decoder runs as a bidirectional encoder (LLM2Vec / NV-Embed).
            features["attention_mask"] = _bidirectional_mask(attention_mask, self.dtype)
            features["use_cache"] = False
        features = self.encoder(features)
        features["attention_mask"] = attention_mask  # pooling wants the 2D padding mask
        features.pop("use_cache", None)
        for head in self.heads:
            features = head(features)
        return truncate_and_normalize(features["sentence_embedding"], dimensions)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype


def _bidirectional_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [batch, 1, seq, seq] mask: 0 where the key is a real token, the dtype's minimum at padding.

    Additive (not boolean) so both the eager and the SDPA attention paths read it the same way.
    """
    keys = attention_mask[:, None, None, :].to(dtype)
    seq = attention_mask.shape[1]
    return ((1.0 - keys) * torch.finfo(dtype).min).expand(-1, 1, seq, -1)


def truncate_and_normalize(embeddings: torch.Tensor, dimensions: torch.Tensor) -> torch.Tensor:
    """L2-normalise, keep the first ``dimensions`` values (clamped to [1, D]), normalise again."""
    full = F.normalize(embeddings.float(), p=2.0, dim=-1)
    n = torch.clamp(dimensions.reshape(1), 1, full.shape[1])
    # A boolean mask over the columns stays dynamic in the trace (a Python slice bound would be frozen).
    keep = torch.arange(full.shape[1], device=full.device) < n
    return F.normalize(full[:, keep], p=2.0, dim=-1)


def describe(model: SentenceTransformer, bidirectional: bool | None = None) -> GraphSpec:
    """Inspect the model: graph inputs, output size, pooling; ``bidirectional=True`` forces full attention."""
    from sentence_transformers.sentence_transformer.modules import Pooling

    pooling = next((m for m in model if isinstance(m, Pooling)), None)
    if pooling is not None and not pooling.include_prompt:
        raise ValueError("models that exclude the prompt from pooling (include_prompt=False) cannot be exported: "
                         "the graph does not know the prompt length")
    mode = pooling.pooling_mode if pooling is not None else "none"
    mode = mode if isinstance(mode, str) else "+".join(mode)
    uses_tt = _takes_token_type_ids(model)
    inputs = ["input_ids", "attention_mask", *(["token_type_ids"] if uses_tt else []), "dimensions"]
    if bidirectional is None:
        # Export the attention as the model runs it (a decoder already made bidirectional stays so, a causal
        # embedder such as Qwen3-Embedding stays causal); only an explicit True forces full attention.
        bidirectional = False
        if is_decoder(model):
            log.info("decoder backbone runs %s attention", "causal" if is_causal(model) else "bidirectional")
    getter = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = getter()
    if dim is None:
        raise ValueError("the model does not report its embedding dimension")
    return GraphSpec(inputs=inputs, dimension=int(dim), pooling=mode, bidirectional=bidirectional)


def _takes_token_type_ids(model: SentenceTransformer) -> bool:
    probe = model.tokenizer(["probe"], return_tensors="pt")
    if "token_type_ids" not in probe:
        return False
    config = getattr(model[0], "config", None) or getattr(backbone(model), "config", None)
    return getattr(config, "type_vocab_size", 0) > 0


def backbone(model: SentenceTransformer) -> torch.nn.Module:
    first = model[0]
    return getattr(first, "model", None) or first.auto_model


def model_type(model: SentenceTransformer) -> str:
    return str(getattr(backbone(model).config, "model_type", ""))


def is_decoder(model: SentenceTransformer) -> bool:
    return model_type(model) in DECODER_TYPES


@contextlib.contextmanager
def eager_attention(model: SentenceTransformer) -> Iterator[None]:
    """Trace the plain MatMul/Softmax attention, not SDPA: same numbers, and a pattern onnxruntime's
    transformer fusions recognise (fused Attention is what makes int8 fast on CPU)."""
    encoder = backbone(model)
    before = getattr(encoder.config, "_attn_implementation", None)
    setter = getattr(encoder, "set_attn_implementation", None)
    if setter is None or before in (None, "eager"):
        yield
        return
    try:
        setter("eager")
    except (ValueError, ImportError) as exc:  # a model without an eager path keeps its own
        log.debug("eager attention unavailable (%s); tracing %s", exc, before)
        yield
        return
    try:
        yield
    finally:
        setter(before)


@torch.no_grad()
def is_causal(model: SentenceTransformer) -> bool:
    """Measure it: a causal encoder's first token does not change when a later token does."""
    ids = model.tokenizer(["alpha beta gamma delta"], return_tensors="pt")["input_ids"]
    other = ids.clone()
    other[0, -1] = (other[0, -1] + 7) % model.tokenizer.vocab_size
    first = [model[0]({"input_ids": x, "attention_mask": torch.ones_like(x)})["token_embeddings"][0, 0]
             for x in (ids, other)]
    return bool(torch.allclose(first[0], first[1], atol=1e-6))


@contextlib.contextmanager
def _quiet_tracer() -> Iterator[None]:
    # The tracer warns about Python-side checks in transformers that are constant for our inputs
    # (mask lengths equal sequence lengths); the parity check verifies the trace instead.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx")
        yield


def trace_to_onnx(model: SentenceTransformer, spec: GraphSpec, path: Path, opset: int = 17) -> Path:
    """Trace the wrapped model to ``path`` with dynamic batch and sequence axes; checks it with onnx."""
    import onnx

    model = model.to("cpu").eval()
    graph = EmbeddingGraph(model, "token_type_ids" in spec.inputs, spec.bidirectional).eval()
    sample = model.tokenizer(["a short one", "a somewhat longer example sentence for tracing"],
                             padding=True, return_tensors="pt")
    args = [sample["input_ids"], sample["attention_mask"]]
    if "token_type_ids" in spec.inputs:
        args.append(sample["token_type_ids"])
    args.append(torch.tensor([spec.dimension], dtype=torch.int64))
    token_axes = {0: "batch", 1: "sequence"}
    dynamic_axes = {name: token_axes for name in spec.inputs if name != "dimensions"}
    dynamic_axes[OUTPUT_NAME] = {0: "batch", 1: "dimensions"}
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("tracing %s to ONNX (opset %d, pooling %s%s)", type(backbone(model)).__name__, opset, spec.pooling,
             ", bidirectional" if spec.bidirectional else "")
    with torch.no_grad(), _quiet_tracer(), eager_attention(model):
        torch.onnx.export(graph, tuple(args), str(path), dynamo=False, opset_version=opset,
                          input_names=spec.inputs, output_names=[OUTPUT_NAME], dynamic_axes=dynamic_axes,
                          external_data=_needs_external_data(model))
    _default_dimensions(path, spec.dimension)
    onnx.checker.check_model(str(path))  # by path: works past the 2 GB protobuf limit too
    return path


def _default_dimensions(path: Path, dimension: int) -> None:
    """Give the ``dimensions`` input a default, the full width: an initializer of the same name, which a
    fed value overrides (ONNX IR >= 4). Loaders that feed only the tokenizer's outputs then run the graph:
    onnxruntime lists ``dimensions`` under ``get_overridable_initializers()``, not ``get_inputs()``, which is
    what Optimum's ORTModelForFeatureExtraction feeds. The serving side keeps sending it explicitly."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=False)  # weights in a side file stay there
    model.graph.initializer.append(numpy_helper.from_array(np.array([dimension], dtype=np.int64), "dimensions"))
    onnx.save(model, str(path))


def _needs_external_data(model: torch.nn.Module) -> bool:
    # Protobuf caps a single file at 2 GB; larger models keep weights in a side file (model.onnx.data).
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size > 1_800_000_000
