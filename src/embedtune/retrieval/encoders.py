"""Things that turn texts into L2-normalised embeddings: a local model, or a served `/v1/embeddings` URL.

Both expose the same small interface (:class:`Encoder`), so the evaluator, the embedding cache and the
reports do not care where vectors come from.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

import numpy as np

from embedtune.console import log, progress
from embedtune.retrieval.formats import ONNX_FILES, OnnxPrecision, model_file
from embedtune.retrieval.precision import pick_precision

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

    from embedtune.config import ModelConfig
    from embedtune.models import ModelSpec

Kind = Literal["query", "passage"]
PLURAL = {"query": "queries", "passage": "passages"}


class Encoder(Protocol):
    label: str

    def encode(self, texts: Sequence[str], kind: Kind) -> np.ndarray:
        """Float32 [len(texts), dim] L2-normalised embeddings."""
        ...

    def cache_key(self, kind: Kind) -> dict[str, object] | None:
        """What, besides the texts, determines the vectors; None = never cache (e.g. a remote server)."""
        ...


def normalize(emb: np.ndarray) -> np.ndarray:
    emb = np.asarray(emb, dtype=np.float32)
    return emb / np.clip(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12, None)


# ------------------------------------------------------------------------------------------ local model


@dataclass
class LocalEncoder:
    """A SentenceTransformer with its query/passage prompts, encoding in length-sorted blocks.

    Texts are sorted by length once for the whole corpus (so batches inside each block hold similar
    lengths, as sentence-transformers does within one ``encode`` call) and encoded block by block, so a
    large corpus shows a progress bar with a rate and an ETA.
    """

    model: SentenceTransformer
    fingerprint: str | None = None  # identity of the weights; None disables caching
    label: str = "model"
    batch_size: int = 64
    block_size: int = 256  # texts per progress step: a few batches, so a slow CPU still moves every few s
    calls: int = field(default=0, init=False)  # how many times the model actually encoded (tests, logs)

    def prompt(self, kind: Kind) -> str:
        name = "query" if kind == "query" else "document"
        return (self.model.prompts or {}).get(name, "")

    def cache_key(self, kind: Kind) -> dict[str, object] | None:
        if self.fingerprint is None:
            return None
        return {"model": self.fingerprint, "prompt": self.prompt(kind),
                "max_seq_length": int(self.model.max_seq_length or 0)}

    def encode(self, texts: Sequence[str], kind: Kind) -> np.ndarray:
        from embedtune.models import encode_passages, encode_queries

        self.calls += 1
        fn = encode_queries if kind == "query" else encode_passages
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out: np.ndarray | None = None
        t0 = time.perf_counter()
        with progress() as bar:
            task = bar.add_task(f"{self.label}: {PLURAL[kind]}", total=len(texts), rate="")
            for start in range(0, len(texts), self.block_size):
                idx = order[start : start + self.block_size]
                emb = fn(self.model, [texts[i] for i in idx], self.batch_size)
                if out is None:
                    out = np.empty((len(texts), emb.shape[1]), dtype=np.float32)
                out[idx] = emb
                bar.advance(task, len(idx))
                if speed := bar.tasks[task].speed:
                    bar.update(task, rate=f"{speed:.1f}/s")
        seconds = time.perf_counter() - t0
        log.debug("%s: %d %s in %.1fs (%.1f/s)", self.label, len(texts), PLURAL[kind], seconds,
                  len(texts) / max(seconds, 1e-9))
        if out is None:  # no texts
            dim = self.model.get_sentence_embedding_dimension() or 0
            out = np.empty((0, dim), dtype=np.float32)
        return out


def load_encoder(model: str | ModelConfig | ModelSpec, label: str | None = None, batch_size: int = 64,
                 path: str | Path | None = None) -> LocalEncoder:
    """Resolve and load a model spec as a :class:`LocalEncoder` with a weights fingerprint.

    ``path`` loads the weights from another folder while keeping the spec's prompts and max length
    (a fine-tuned copy of the base model).
    """
    from embedtune.models import ModelSpec, load_model, resolve

    spec = model if isinstance(model, ModelSpec) else resolve(model)
    if path is not None:
        spec = replace(spec, path=str(Path(path).resolve()))
    st = load_model(spec)
    return LocalEncoder(st, model_fingerprint(spec.path), label or spec.name, batch_size)


def model_fingerprint(path_or_id: str | Path) -> str:
    """Identity of a model's weights: the SHA-256 of a local folder's files, or ``hub:<id>``.

    Content hashing (not size + mtime) so that a copied or re-saved but identical model still hits
    the cache and a changed one never does; hashing is memoised per process on the files' size and
    mtime, and costs a few seconds per GB, far less than encoding a corpus.
    """
    p = Path(path_or_id)
    if not p.is_dir():
        return f"hub:{path_or_id}"
    files = sorted(f for f in p.rglob("*") if f.is_file() and not _ignored(f.relative_to(p)))
    stats = tuple((str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _hash_files(str(p.resolve()), stats)


def _ignored(rel: Path) -> bool:
    # Training checkpoints and hidden files do not change what the saved model computes.
    return any(part.startswith(".") or part in {"checkpoints", "runs", "__pycache__"} for part in rel.parts)


@functools.lru_cache(maxsize=64)
def _hash_files(root: str, stats: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    for rel, _, _ in stats:
        h.update(rel.encode() + b"\0")
        with (Path(root) / rel).open("rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return "sha256:" + h.hexdigest()[:32]


# ------------------------------------------------------------------------------------------ endpoint


@dataclass
class EndpointEncoder:
    """An OpenAI-compatible ``/v1/embeddings`` server (NIM field ``input_type`` for query vs passage).

    Retries with exponential backoff (429, 5xx, connection errors) are the official client's own.
    """

    base_url: str
    model_name: str
    api_key: str | None = None
    batch_size: int = 64
    dimensions: int | None = None
    max_retries: int = 5
    timeout: float = 120.0
    label: str = "endpoint"
    passage_input_type: str = "passage"

    def __post_init__(self) -> None:
        from openai import OpenAI

        url = self.base_url.rstrip("/")
        if not url.endswith("/v1"):
            url += "/v1"
        self.client = OpenAI(base_url=url, api_key=self.api_key or "not-needed",
                             max_retries=self.max_retries, timeout=self.timeout)

    def cache_key(self, kind: Kind) -> dict[str, object] | None:
        return None  # what a server returns may change between calls: always ask it

    def encode(self, texts: Sequence[str], kind: Kind) -> np.ndarray:
        input_type = "query" if kind == "query" else self.passage_input_type
        extra = {"dimensions": self.dimensions} if self.dimensions else {}
        rows: list[list[float]] = []
        with progress() as bar:
            task = bar.add_task(f"{self.label}: {PLURAL[kind]}", total=len(texts), rate="")
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start : start + self.batch_size])
                resp = self.client.embeddings.create(model=self.model_name, input=batch,
                                                     extra_body={"input_type": input_type}, **extra)
                data = sorted(resp.data, key=lambda d: d.index)
                if len(data) != len(batch):
                    raise ValueError(f"{self.base_url}: asked for {len(batch)} embeddings, got {len(data)}")
                rows.extend(d.embedding for d in data)
                bar.advance(task, len(batch))
        if not rows:
            return np.empty((0, self.dimensions or 0), dtype=np.float32)
        return normalize(np.asarray(rows, dtype=np.float32))


# ------------------------------------------------------------------------------------------ ONNX export


@dataclass
class OnnxModelEncoder:
    """An ONNX export (what `embedtune serve` deploys on a CPU: int8 when exported) as an :class:`Encoder`."""

    folder: Path
    precision: OnnxPrecision = "int8"
    label: str = "onnx"
    batch_size: int = 32
    block_size: int = 128  # texts per progress step (see LocalEncoder)

    def __post_init__(self) -> None:
        from embedtune.retrieval.onnx import OnnxEncoder

        self.folder = Path(self.folder)
        self.model = OnnxEncoder(self.folder, self.precision)
        self.fingerprint = model_fingerprint_file(model_file(self.folder, self.precision))

    def prompt_name(self, kind: Kind) -> str | None:
        name = "query" if kind == "query" else "document"
        return name if name in self.model.prompts else None

    def cache_key(self, kind: Kind) -> dict[str, object] | None:
        return {"model": self.fingerprint, "precision": self.precision,
                "prompt": self.model.prompts.get(self.prompt_name(kind) or "", ""),
                "max_seq_length": self.model.max_seq_length}

    def encode(self, texts: Sequence[str], kind: Kind) -> np.ndarray:
        out = np.empty((len(texts), self.model.dimension), dtype=np.float32)
        with progress() as bar:
            task = bar.add_task(f"{self.label}: {PLURAL[kind]}", total=len(texts), rate="")
            for start in range(0, len(texts), self.block_size):
                block = list(texts[start : start + self.block_size])
                out[start : start + len(block)] = self.model.encode(block, prompt_name=self.prompt_name(kind),
                                                                    batch_size=self.batch_size)
                bar.advance(task, len(block))
        return out


def model_fingerprint_file(path: Path) -> str:
    stat = path.stat()
    return _hash_files(str(path.parent.resolve()), ((path.name, stat.st_size, stat.st_mtime_ns),))


# ------------------------------------------------------------------------------------------ a run's model


@dataclass(frozen=True)
class ServedModel:
    """Which weights a run deploys: its ONNX export (int8 on CPU), else its fine-tuned folder, else the base."""

    kind: Literal["onnx", "torch"]
    path: str
    precision: str | None
    label: str

    def load(self, model: str | ModelConfig | ModelSpec, batch_size: int = 64) -> Encoder:
        if self.kind == "onnx":
            return OnnxModelEncoder(Path(self.path), self.precision or "fp32", self.label,  # type: ignore[arg-type]
                                    batch_size=min(batch_size, 32))
        path = None if self.label == "base" else self.path
        return load_encoder(model, self.label, batch_size, path=path)


def served_model(run_root: str | Path, base_path: str | None = None, prefer_onnx: bool = True,
                 precision: str = "auto") -> ServedModel:
    """The model `embedtune serve --model PATH` loads on this machine from a run directory (or an export or
    model folder): its ONNX export (``auto``: int8 on a CPU, fp32 on a GPU), else its fine-tuned folder,
    else ``base_path``. Without ``base_path``, a folder holding no model is a FileNotFoundError."""
    root = Path(run_root)
    export = export_folder(root) if prefer_onnx else None
    if export is not None:
        chosen = pick_precision(export, _has_cuda(), precision)
        return ServedModel("onnx", str(export), chosen, f"export ({chosen})")
    finetuned = torch_folder(root)
    if finetuned is not None:
        return ServedModel("torch", str(finetuned), None, "fine-tuned")
    if base_path is None:
        raise FileNotFoundError(f"{run_root} holds no model: expected a sentence-transformers/transformers "
                                "folder, a run directory with finetune/model, or an ONNX export")
    return ServedModel("torch", base_path, None, "base")


def export_folder(path: Path) -> Path | None:
    """The ONNX export inside ``path`` (a run directory) or ``path`` itself, if there is one."""
    from embedtune.retrieval.metadata import METADATA_FILE

    for folder in (path, path / "export"):
        if (folder / METADATA_FILE).is_file() and any(model_file(folder, p).is_file() for p in ONNX_FILES):
            return folder
    return None


def torch_folder(path: Path) -> Path | None:
    """The sentence-transformers / transformers folder ``path`` is, or its run's ``finetune/model``."""
    for folder in (path, path / "finetune" / "model"):
        if (folder / "modules.json").is_file() or (folder / "config.json").is_file():
            return folder
    return None


def _has_cuda() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()
