"""``export_onnx``: a SentenceTransformer (object, folder or spec) -> a self-contained serving folder.

Folder contract (the serving side codes against it)::

    model.onnx          fp32, inputs input_ids, attention_mask[, token_type_ids], dimensions -> embeddings
    model.int8.onnx     dynamic int8 (CPU); this and the other derived files (fp16, fp8 plan where a GPU
                        exists) are listed in :mod:`embedtune.convert.formats` / :mod:`embedtune.retrieval.formats`
    tokenizer/          AutoTokenizer.from_pretrained(folder / "tokenizer")
    config.json, tokenizer files   the backbone's config and the tokenizer again at the top, for Hugging Face
                        loaders: ``AutoConfig``/``AutoTokenizer.from_pretrained(folder)``, Optimum's
                        ``ORTModelForFeatureExtraction.from_pretrained(folder)`` (``dimensions`` defaults
                        to the full width, so feeding the tokenizer's outputs alone works)
    embedtune.json      dimension, matryoshka_dims, max_seq_length, prompts, inputs, output, opset, pooling, source
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embedtune.config import ExportConfig
from embedtune.console import log
from embedtune.convert.formats import BuildContext, build_formats
from embedtune.convert.graph import OUTPUT_NAME, backbone, describe, trace_to_onnx
from embedtune.retrieval.formats import MODEL_FORMATS, model_file
from embedtune.retrieval.metadata import write_metadata

if TYPE_CHECKING:
    from collections.abc import Sequence

    from sentence_transformers import SentenceTransformer


@dataclass
class ExportResult:
    folder: Path
    metadata: dict[str, Any]
    files: list[Path]
    formats: dict[str, dict[str, Any]] = field(default_factory=dict)  # derived format -> its build record

    @property
    def int8(self) -> dict[str, Any] | None:
        return self.formats.get("int8")

    @property
    def gpu(self) -> dict[str, dict[str, Any]]:
        return {n: r for n, r in self.formats.items() if MODEL_FORMATS[n].device == "gpu"}


def export_onnx(model_or_path: SentenceTransformer | str | Path, out_dir: str | Path,
                cfg: ExportConfig | None = None, *, matryoshka_dims: Sequence[int] | None = None,
                bidirectional: bool | None = None, source: str | None = None) -> ExportResult:
    """Export a model to ``out_dir`` (files are built aside and moved in, so a crash leaves no half-file):
    the fp32 graph, then every format of :data:`~embedtune.convert.formats.FORMATS` that ``cfg`` asks for.

    ``matryoshka_dims`` are the sizes the model was trained for (recorded in embedtune.json).
    ``bidirectional=True`` gives a decoder backbone (Llama & co.) a full attention mask inside the graph,
    making a plain causal checkpoint a bidirectional encoder; None/False export the attention as the
    PyTorch model runs it (so a model already made bidirectional stays bidirectional).
    """
    cfg = cfg or ExportConfig()
    model, source = _as_model(model_or_path, source)
    spec = describe(model, bidirectional)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        fp32 = trace_to_onnx(model, spec, model_file(staging, "fp32"), cfg.opset)
        formats = build_formats(BuildContext(fp32, staging, cfg, model))
        model.tokenizer.save_pretrained(str(staging / "tokenizer"))
        _loader_files(model, staging)
        metadata = _metadata(model, spec, cfg.opset, matryoshka_dims, source)
        write_metadata(staging, metadata)
        files = _move_into(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("exported %s to %s", source, out_dir)
    return ExportResult(out_dir, metadata, files, formats)


def _loader_files(model: Any, folder: Path) -> None:
    """What Hugging Face loaders look for at a model folder's top: ``config.json`` (the backbone's
    transformers config: ``AutoConfig`` and Optimum's ``ORTModel*.from_pretrained`` read it) and the tokenizer
    files (``AutoTokenizer.from_pretrained(folder)``). ``tokenizer/`` stays for the serving contract."""
    backbone(model).config.to_json_file(str(folder / "config.json"))
    model.tokenizer.save_pretrained(str(folder))


def _as_model(model_or_path: SentenceTransformer | str | Path, source: str | None) -> tuple[Any, str]:
    if isinstance(model_or_path, str | Path):
        from embedtune.models import load_model

        return load_model(str(model_or_path), device="cpu"), source or str(model_or_path)
    config = getattr(getattr(model_or_path[0], "model", None), "config", None)
    return model_or_path, source or str(getattr(config, "_name_or_path", "") or "in-memory model")


def _metadata(model: Any, spec: Any, opset: int, matryoshka_dims: Sequence[int] | None,
              source: str) -> dict[str, Any]:
    prompts = model.prompts or {}
    return {
        "dimension": spec.dimension,
        "matryoshka_dims": _clean_dims(matryoshka_dims, spec.dimension),
        "max_seq_length": int(model.max_seq_length or model.tokenizer.model_max_length),
        "prompts": {"query": _prompt(prompts, QUERY_NAMES), "document": _prompt(prompts, DOCUMENT_NAMES)},
        "inputs": spec.inputs,
        "output": OUTPUT_NAME,
        "opset": opset,
        "pooling": spec.pooling,
        "source": source,
    }


# sentence-transformers' encode_query / encode_document look for these prompt names, in this order.
QUERY_NAMES = ("query",)
DOCUMENT_NAMES = ("document", "passage", "corpus")


def _prompt(prompts: dict[str, str], names: tuple[str, ...]) -> str:
    return next((prompts[n] for n in names if n in prompts), "")


def _clean_dims(dims: Sequence[int] | None, full: int) -> list[int] | None:
    """Sizes the model was trained to truncate to, largest first, always including the full size."""
    if not dims:
        return None
    kept = {int(d) for d in dims if 0 < int(d) <= full} | {full}
    return sorted(kept, reverse=True)


def _move_into(staging: Path, out_dir: Path) -> list[Path]:
    moved = []
    for item in sorted(staging.iterdir()):
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        item.replace(target)
        moved.append(target)
    # Precision files from an earlier export that this one did not rebuild would be stale: remove them.
    for stale in {f.file for f in MODEL_FORMATS.values()} - {p.name for p in moved}:
        (out_dir / stale).unlink(missing_ok=True)
    return moved
