"""What a model spec resolves to, and the model types loaded as bidirectional decoders: below both the resolver
(:mod:`embedtune.models`) and the converters (:mod:`embedtune.models.gguf`, :mod:`embedtune.convert.graph`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: transformers ``model_type``s of decoder LLMs: made bidirectional and mean-pooled to embed.
DECODER_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"})


class ModelNotFoundError(ValueError):
    """The model spec names nothing that can be loaded here."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: str  # local folder or hub id
    query_prompt: str = ""
    passage_prompt: str = ""
    pooling: str | None = None
    max_seq_length: int | None = None

    @property
    def is_local(self) -> bool:
        return Path(self.path).is_dir()
