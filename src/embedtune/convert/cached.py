"""A model's ONNX int8 export, built once per model identity in the embedtune cache and reused after.

The sdg round-trip filter encodes every chunk and every candidate query with the base model; with the
ONNX int8 encoder that costs a fraction of torch fp32 on a CPU. The export lands in
``$EMBEDTUNE_CACHE/onnx/<key>/`` (default ``~/.cache/embedtune/onnx/``), keyed by the weights' content
fingerprint and everything else the export bakes in (prompts, max length, pooling); it is built under a
temporary name and renamed (:func:`embedtune.models.cache.ensure_converted`), so an interrupted export
never looks complete. A model that cannot be exported, or whose export does not reproduce it, gives
None: the caller falls back to torch and says so in the log.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from embedtune.console import log

if TYPE_CHECKING:
    from embedtune.config import ModelConfig
    from embedtune.models import ModelSpec
    from embedtune.retrieval.encoders import OnnxModelEncoder

#: Bumped when what this module does with an export changes (the export code itself is fingerprinted).
EXPORT_VERSION = 2
#: int8 vs torch fp32 on the probe texts: below this the export is not trusted (a broken trace, a model
#: whose int8 graph saturates); all-MiniLM-L6-v2 measures a min cosine of ~0.997.
MIN_PROBE_COSINE = 0.98


def onnx_dir() -> Path:
    from embedtune.models.cache import cache_root

    return cache_root() / "onnx"


def export_marker(spec: ModelSpec) -> dict[str, object]:
    """Everything that decides the cached export: weights content, prompts, max length, pooling, version."""
    from embedtune.retrieval.encoders import model_fingerprint

    return {"export_version": EXPORT_VERSION, "exporter": _exporter_fingerprint(), "precision": "int8",
            "model": model_fingerprint(spec.path), "query_prompt": spec.query_prompt,
            "passage_prompt": spec.passage_prompt, "max_seq_length": spec.max_seq_length, "pooling": spec.pooling}


def _exporter_fingerprint() -> str:
    """The export code itself (tracing and quantisation rules) and onnxruntime's version: a change to either
    rebuilds the cached export instead of reusing one made by other rules."""
    import onnxruntime

    h = hashlib.sha256(onnxruntime.__version__.encode())
    for name in ("graph.py", "quantize.py", "onnx_export.py"):
        h.update((Path(__file__).with_name(name)).read_bytes())
    return h.hexdigest()[:16]


def cached_int8_encoder(model: str | ModelConfig | ModelSpec, label: str = "base model (onnx int8)",
                        folder: Path | None = None) -> OnnxModelEncoder | None:
    """The model's ONNX int8 encoder (exported on first use, from the cache after); None when impossible."""
    from embedtune.models import ModelSpec, resolve

    try:
        spec = model if isinstance(model, ModelSpec) else resolve(model)
        marker = export_marker(spec)
        # The folder is named by the model's identity; a new exporter rebuilds it in place (marker mismatch).
        identity = {k: v for k, v in marker.items() if k != "exporter"}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]
        folder = folder or onnx_dir() / f"{Path(spec.path).name or 'model'}-{key}"
        return _load(spec, folder, marker, label)
    except Exception as exc:  # noqa: BLE001 - any failure (tracer, quantiser, onnxruntime missing) means torch
        log.warning("ONNX int8 encoder unavailable for %s (%s: %s); encoding with torch fp32 instead",
                    getattr(model, "name", model), type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return None


def _load(spec: ModelSpec, folder: Path, marker: dict[str, object], label: str) -> OnnxModelEncoder:
    from embedtune.models.cache import ensure_converted, is_converted, write_marker
    from embedtune.retrieval.encoders import OnnxModelEncoder

    def build(out: Path) -> None:
        _export_checked(spec, out)
        write_marker(out, marker)

    if is_converted(folder, marker):
        log.info("%s: reusing the cached ONNX int8 export at %s", spec.name, folder)
    ensure_converted(folder, marker, build, f"{spec.name}", into="an ONNX int8 encoder")
    return OnnxModelEncoder(folder, "int8", label)


def _export_checked(spec: ModelSpec, out: Path) -> None:
    """Export into ``out`` and prove the int8 graph reproduces the torch model on the probe texts."""
    from embedtune.config import ExportConfig
    from embedtune.convert.onnx_export import export_onnx
    from embedtune.convert.parity import PROBE_QUERIES, probe_passages
    from embedtune.models import encode_passages, encode_queries, load_model
    from embedtune.retrieval.onnx import OnnxEncoder

    model = load_model(spec, device="cpu")
    # The filters must reproduce torch's decisions, not serve fast: the attention QKV and FFN down-projections
    # stay fp32 (probe cosine 0.996; the serving default's 0.977 fell below MIN_PROBE_COSINE on SciFact).
    cfg = ExportConfig(int8_exclude_sensitive=True, int8_quantize_attention=False, gpu_precisions=[])
    export_onnx(model, out, cfg, source=spec.path)
    for name in ("model.onnx", "model.onnx.data"):  # only int8 is used from the cache: keep it small
        (out / name).unlink(missing_ok=True)
    int8 = OnnxEncoder(out, "int8")
    passages = probe_passages()
    pairs = [(encode_queries(model, PROBE_QUERIES), int8.encode(PROBE_QUERIES, prompt_name=_name(int8, "query"))),
             (encode_passages(model, passages), int8.encode(passages, prompt_name=_name(int8, "document")))]
    worst = min(float((a * b).sum(1).min()) for a, b in pairs)
    if worst < MIN_PROBE_COSINE:
        raise ValueError(f"the int8 export does not reproduce the model (min probe cosine {worst:.4f} "
                         f"< {MIN_PROBE_COSINE})")
    log.info("ONNX int8 export checked against torch (min probe cosine %.4f)", worst)


def _name(encoder: object, kind: str) -> str | None:
    return kind if kind in encoder.prompts else None  # type: ignore[attr-defined]

