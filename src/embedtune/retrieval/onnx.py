"""Run an exported folder with nothing but onnxruntime and the tokenizer.

``OnnxEncoder(folder).encode(texts, prompt_name="query", dimensions=256)`` tokenises exactly as
sentence-transformers does (prompt prepended to the text, longest padding, truncation at the model's
max length) and returns the graph's L2-normalised float32 embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedtune.artifacts import ArtifactError
from embedtune.cpu_share import current_threads
from embedtune.retrieval.formats import ONNX_FILES as MODEL_FILES
from embedtune.retrieval.formats import OnnxPrecision
from embedtune.retrieval.metadata import METADATA_FILE, read_metadata


def default_threads() -> int:
    """Intra-op threads: this job's share of the cores it may use (:mod:`embedtune.cpu_share`), at least 1."""
    return current_threads()


def session_options(threads: int | None = None) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or default_threads()
    # One request's batch is one graph run; parallel branches are rare in encoders, so one inter-op thread.
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return opts


class OnnxEncoder:
    """An exported embedding model: tokenizer + ONNX session + the metadata in ``embedtune.json``."""

    def __init__(self, folder: str | Path, precision: OnnxPrecision = "int8", threads: int | None = None,
                 providers: Sequence[str] | None = None):
        import onnxruntime as ort
        from transformers import AutoTokenizer

        self.folder = Path(folder)
        self.meta: dict[str, Any] = read_metadata(self.folder)
        if not self.meta:
            raise ArtifactError(f"{self.folder} has no {METADATA_FILE}: not an embedtune ONNX export")
        if precision not in MODEL_FILES:
            raise ValueError(f"precision must be one of {', '.join(MODEL_FILES)}, got {precision!r}")
        model_path = self.folder / MODEL_FILES[precision]
        if not model_path.is_file():
            raise ArtifactError(f"{model_path} not found: this export has no {precision} model")
        self.precision = precision
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.folder / "tokenizer"))
        self.session = ort.InferenceSession(str(model_path), sess_options=session_options(threads),
                                            providers=list(providers or ["CPUExecutionProvider"]))
        self.input_names: list[str] = list(self.meta["inputs"])

    @property
    def dimension(self) -> int:
        return int(self.meta["dimension"])

    @property
    def max_seq_length(self) -> int:
        return int(self.meta["max_seq_length"])

    @property
    def prompts(self) -> dict[str, str]:
        return dict(self.meta.get("prompts") or {})

    def encode(self, texts: str | Sequence[str], prompt_name: str | None = None, dimensions: int | None = None,
               batch_size: int = 32, prompt: str | None = None) -> np.ndarray:
        """Embeddings [len(texts), dimensions or D], float32, L2-normalised."""
        if isinstance(texts, str):
            texts = [texts]
        n = self._check_dimensions(dimensions)
        prefix = prompt if prompt is not None else self._prompt(prompt_name)
        if not texts:
            return np.zeros((0, n), dtype=np.float32)
        tokens = self.tokenizer([prefix + t for t in texts], truncation="longest_first",
                                max_length=self.max_seq_length)
        ids = tokens["input_ids"]
        # Longest first by token count (texts tokenised once, unpadded): each batch holds similar lengths and
        # pads only to its own longest, so a length-mixed input pays little padding (the bench measures it).
        order = sorted(range(len(texts)), key=lambda i: -len(ids[i]))
        out = np.zeros((len(texts), n), dtype=np.float32)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            out[idx] = self.run_tokens(self._pad({k: [v[i] for i in idx] for k, v in tokens.items()}), n)
        return out

    def encode_queries(self, texts: Sequence[str], **kw: Any) -> np.ndarray:
        return self.encode(texts, prompt_name="query", **kw)

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer(list(texts), padding=True, truncation="longest_first", max_length=self.max_seq_length,
                             return_tensors="np")
        return {k: np.asarray(v, dtype=np.int64) for k, v in enc.items()}

    def run_tokens(self, tokens: dict[str, np.ndarray], dimensions: int | None = None) -> np.ndarray:
        """Run the graph on already tokenised input (a server that tokenises itself calls this)."""
        feeds = {name: tokens[name] for name in self.input_names if name != "dimensions"}
        feeds["dimensions"] = np.array([self._check_dimensions(dimensions)], dtype=np.int64)
        return self.session.run([self.meta.get("output", "embeddings")], feeds)[0]

    def _pad(self, batch: dict[str, list[list[int]]]) -> dict[str, np.ndarray]:
        """Pad one batch of token lists to its longest, as the tokenizer's own padding does."""
        tok = self.tokenizer
        width = max(len(row) for row in batch["input_ids"])
        fill = {"input_ids": tok.pad_token_id or 0, "token_type_ids": tok.pad_token_type_id}
        out = {}
        for key, rows in batch.items():
            arr = np.full((len(rows), width), fill.get(key, 0), dtype=np.int64)
            for r, row in enumerate(rows):
                if tok.padding_side == "left":
                    arr[r, width - len(row):] = row
                else:
                    arr[r, :len(row)] = row
            out[key] = arr
        return out

    def _prompt(self, prompt_name: str | None) -> str:
        if prompt_name is None:
            return ""
        if prompt_name not in self.prompts:
            raise ValueError(f"unknown prompt {prompt_name!r}; this model has: {', '.join(self.prompts) or 'none'}")
        return self.prompts[prompt_name]

    def _check_dimensions(self, dimensions: int | None) -> int:
        if dimensions is None:
            return self.dimension
        if not 1 <= int(dimensions) <= self.dimension:
            raise ValueError(f"dimensions must be between 1 and {self.dimension}, got {dimensions}")
        return int(dimensions)
