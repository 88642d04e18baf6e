"""Embedding backends behind one small interface: sentence-transformers (torch) and ONNX Runtime.

The server works in token ids (see :mod:`embedtune.serve.tokens`): a backend tokenises requests, then
embeds batches of id lists at full width; Matryoshka truncation happens afterwards, per request, so one
batch can mix requests that ask for different ``dimensions``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from embedtune.config import ServePrecision
from embedtune.retrieval.formats import model_file
from embedtune.retrieval.metadata import read_metadata
from embedtune.retrieval.precision import pick_precision
from embedtune.serve.tokens import InputType, Tokenization, Truncate

BackendKind = Literal["auto", "onnx", "torch"]


class DimensionsError(ValueError):
    """A Matryoshka size the model cannot produce."""


def reduce_dimensions(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """Matryoshka: keep the first ``dimensions`` values, then L2-normalise again."""
    if dimensions is None or dimensions >= vectors.shape[1]:
        return vectors
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return (cut / np.maximum(norms, 1e-12)).astype(np.float32)


#: A micro-batch ends before padding would make up more than this share of its tokens.
MAX_PADDING = 0.2


def micro_batches(lengths: Sequence[int], size: int, max_padding: float = MAX_PADDING) -> list[list[int]]:
    """Indices sorted by length, cut into runs of at most ``size`` whose padding to their longest stays within
    ``max_padding`` of their tokens. Fixed cuts of 32 padded a server's short queries (5-46 tokens, mean 18)
    to 2.5x their tokens, and onnxruntime ran them at half the speed of one query at a time (AVX2-only EPYC)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    tokens = 0
    for i in order:
        longest = max(lengths[i], 1)
        if batches and len(batches[-1]) < size and (len(batches[-1]) + 1) * longest * (1 - max_padding) <= (
                tokens + lengths[i]):
            batches[-1].append(i)
            tokens += lengths[i]
        else:
            batches.append([i])
            tokens = lengths[i]
    return batches


class Backend(ABC):
    """Tokenise inputs and embed token-id batches; everything the server needs from a model."""

    kind: str = "abstract"

    def __init__(self, tokenization: Tokenization, dimension: int, matryoshka_dims: Sequence[int] | None,
                 micro_batch: int = 32):
        self.tokenization = tokenization
        self.dimension = int(dimension)
        self.matryoshka_dims = sorted({int(d) for d in matryoshka_dims}) if matryoshka_dims else None
        self.micro_batch = micro_batch

    @property
    def max_tokens(self) -> int:
        return self.tokenization.max_tokens

    def describe(self) -> str:
        return f"{self.kind}, {self.dimension} dims, {self.max_tokens} max tokens"

    # ------------------------------------------------------------------ the serving interface

    def check_dimensions(self, dimensions: int | None) -> None:
        if dimensions is None:
            return
        if dimensions <= 0 or dimensions > self.dimension:
            raise DimensionsError(f"dimensions must be between 1 and {self.dimension} for this model, "
                                  f"got {dimensions}")
        allowed = self.matryoshka_dims
        if allowed and dimensions != self.dimension and dimensions not in allowed:
            raise DimensionsError(f"this model was trained for dimensions {allowed} (or {self.dimension}); "
                                  f"got {dimensions}")

    def tokenize(self, inputs: Sequence[str] | Sequence[Sequence[int]], input_type: InputType | None = None,
                 truncate: Truncate = "NONE") -> list[list[int]]:
        if inputs and not isinstance(inputs[0], str):
            return self.tokenization.encode_token_ids(inputs, input_type, truncate)  # type: ignore[arg-type]
        return self.tokenization.encode_texts(inputs, input_type, truncate)  # type: ignore[arg-type]

    def embed_tokens(self, batch: Sequence[Sequence[int]]) -> np.ndarray:
        """Full-width, L2-normalised float32 embeddings of token-id lists, in the given order.

        Inputs are sorted by length and run in micro-batches of similar lengths (:func:`micro_batches`), so that
        short inputs are not padded to the longest one of a large batch.
        """
        out = np.empty((len(batch), self.dimension), dtype=np.float32)
        for chunk in micro_batches([len(ids) for ids in batch], self.micro_batch):
            ids, mask = self._pad([batch[i] for i in chunk])
            out[chunk] = self._forward(ids, mask)
        return out

    def encode(self, inputs: Sequence[str] | Sequence[Sequence[int]], input_type: InputType | None = None,
               dimensions: int | None = None, truncate: Truncate = "END") -> np.ndarray:
        """One-shot encoding without the server's batcher (also the benchmark's baseline)."""
        self.check_dimensions(dimensions)
        vectors = self.embed_tokens(self.tokenize(inputs, input_type, truncate))
        return reduce_dimensions(vectors, dimensions)

    # ------------------------------------------------------------------ per-runtime parts

    def _pad(self, batch: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        width = max(len(ids) for ids in batch)
        ids = np.full((len(batch), width), self.tokenization.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, seq in enumerate(batch):
            span = slice(width - len(seq), width) if self.tokenization.pad_left else slice(0, len(seq))
            ids[row, span] = seq
            mask[row, span] = 1
        return ids, mask

    @abstractmethod
    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Normalised full-width embeddings of one padded micro-batch."""


class TorchBackend(Backend):
    """A sentence-transformers model run module by module on our own token ids."""

    kind = "torch"

    def __init__(self, model, matryoshka_dims: Sequence[int] | None = None, micro_batch: int = 32):
        from embedtune.models import max_tokens

        _refuse_prompt_excluding_pooling(model)
        self.model = model.eval()
        tokenization = Tokenization(model.tokenizer, dict(model.prompts or {}), max_tokens(model))
        super().__init__(tokenization, model.get_embedding_dimension(), matryoshka_dims, micro_batch)

    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        import torch

        device = self.model.device
        features = {"input_ids": torch.from_numpy(input_ids).to(device),
                    "attention_mask": torch.from_numpy(attention_mask).to(device)}
        with torch.inference_mode():
            emb = self.model.forward(features)["sentence_embedding"]
            emb = torch.nn.functional.normalize(emb.float(), dim=-1)
        return emb.cpu().numpy()


def _refuse_prompt_excluding_pooling(model) -> None:
    # Pooling(include_prompt=False) needs one prompt length per batch; the batcher mixes queries and
    # passages, so such models would be served wrongly. Say so rather than return different vectors.
    for module in model:
        if getattr(module, "include_prompt", True) is False and any((model.prompts or {}).values()):
            raise ValueError("models whose pooling excludes the prompt (include_prompt=False) are not "
                             "supported by the server yet")


class OnnxBackend(Backend):
    """The export stage's ONNX graph (pooling, normalisation and Matryoshka inside) with its tokenizer.

    Contract of an export folder (:mod:`embedtune.retrieval.formats`): ``model.onnx`` (fp32), optional
    ``model.int8.onnx`` (``auto`` serves it on a CPU), ``tokenizer/``
    and ``embedtune.json`` {dimension, matryoshka_dims, max_seq_length, prompts{query, document},
    inputs[names], output}. Graph inputs ``input_ids``/``attention_mask`` (int64 [batch, seq]),
    ``token_type_ids`` only when listed, ``dimensions`` (int64 [1]); output float32 [batch, dimensions].
    """

    kind = "onnx"

    def __init__(self, folder: str | Path, precision: ServePrecision = "auto", micro_batch: int = 32,
                 threads: int | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        folder = Path(folder)
        meta = read_metadata(folder)
        self.precision = pick_precision(folder, "CUDAExecutionProvider" in ort.get_available_providers(), precision)
        self.model_file = model_file(folder, self.precision)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: its warnings about the graph's defaults are not the user's
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.model_file), options, providers=_providers(ort))
        # The graph's own inputs are the truth (the manifest's "inputs" may or may not list "dimensions").
        self.input_names = [i.name for i in self.session.get_inputs()]
        unknown = set(self.input_names) - {"input_ids", "attention_mask", "token_type_ids", "dimensions"}
        if unknown:
            raise ValueError(f"{self.model_file} has graph inputs this server does not know: "
                             f"{sorted(unknown)}")
        self.output_name = meta.get("output", "embeddings")
        tokenizer = AutoTokenizer.from_pretrained(str(folder / "tokenizer"), local_files_only=True)
        tokenization = Tokenization(tokenizer, meta.get("prompts") or {}, int(meta["max_seq_length"]))
        self.kind = f"onnx-{self.precision}"
        if self.precision == "int8":
            # Dynamic int8 quantises each MatMul's input with one scale for the whole batch, padding included,
            # so a text's vector would depend on the other clients' texts the batcher put beside it (cosine
            # 0.993, max |delta| 0.022, issue 30). Each text runs alone, unpadded: the same vector in any batch.
            micro_batch = 1
        super().__init__(tokenization, int(meta["dimension"]), meta.get("matryoshka_dims"), micro_batch)

    def _forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "token_type_ids": np.zeros_like(input_ids),
                 "dimensions": np.array([self.dimension], dtype=np.int64)}
        (emb,) = self.session.run([self.output_name], {name: feeds[name] for name in self.input_names})
        return np.asarray(emb, dtype=np.float32)


def _providers(ort) -> list[str]:
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
