"""The export formats derived from the fp32 graph: one entry each, the seam for adding a format.

An entry says when the recipe asks for it, how it is built from the traced fp32 graph, and whether
parity checks it against fp32 (cosine on the probe set, retrieval metrics on the eval set). Its file name,
device and loader are in :data:`embedtune.retrieval.formats.MODEL_FORMATS` (same key), which the server,
the index stage and the platform read. A format that cannot be built on this machine (no GPU, no
TensorRT) records ``{"status": "skipped", "reason": ...}`` instead of failing the export.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embedtune.config import ExportConfig
from embedtune.console import log
from embedtune.convert.graph import backbone, model_type
from embedtune.convert.quantize import FUSABLE_TYPES, build_gpu_precisions, quantize_int8
from embedtune.retrieval.formats import MODEL_FORMATS


@dataclass(frozen=True)
class BuildContext:
    """What a builder gets: the fp32 graph, the (staging) folder to write into, the settings and the model."""

    fp32: Path
    out_dir: Path
    cfg: ExportConfig
    model: Any

    def path(self, precision: str) -> Path:
        return self.out_dir / MODEL_FORMATS[precision].file


@dataclass(frozen=True)
class ExportFormat:
    name: str  # key of MODEL_FORMATS
    wanted: Callable[[ExportConfig], bool]
    build: Callable[[BuildContext], dict[str, Any]]  # writes ctx.path(name); returns its record
    parity_vs_fp32: bool  # checked against fp32 by the export stage (only formats onnxruntime runs on a CPU)


def _build_int8(ctx: BuildContext) -> dict[str, Any]:
    cfg = ctx.cfg
    log.info("quantising to int8 (dynamic, QInt8 weights)")
    return quantize_int8(ctx.fp32, ctx.path("int8"), cfg.int8_per_channel, cfg.int8_reduce_range,
                         cfg.int8_exclude_sensitive, fuse=_fusion_shape(ctx.model),
                         quantize_attention=cfg.int8_quantize_attention)


def _build_gpu(precision: str) -> Callable[[BuildContext], dict[str, Any]]:
    def build(ctx: BuildContext) -> dict[str, Any]:
        return build_gpu_precisions(ctx.fp32, ctx.out_dir, [precision])[precision]

    return build


def _fusion_shape(model: Any) -> tuple[int, int] | None:
    """(num_heads, hidden_size) for onnxruntime's BERT fusions, which cannot always infer them."""
    if model_type(model) not in FUSABLE_TYPES:
        return None
    config = backbone(model).config
    heads, hidden = getattr(config, "num_attention_heads", 0), getattr(config, "hidden_size", 0)
    return (int(heads), int(hidden)) if heads and hidden else None


# Built in this order after the fp32 graph (fp32 itself is traced, not derived: it is not listed here).
FORMATS: dict[str, ExportFormat] = {f.name: f for f in (
    ExportFormat("int8", lambda cfg: cfg.int8, _build_int8, parity_vs_fp32=True),
    ExportFormat("fp16", lambda cfg: "fp16" in cfg.gpu_precisions, _build_gpu("fp16"), parity_vs_fp32=False),
    ExportFormat("fp8", lambda cfg: "fp8" in cfg.gpu_precisions, _build_gpu("fp8"), parity_vs_fp32=False),
)}
assert set(FORMATS) <= set(MODEL_FORMATS), "every export format needs its row in retrieval.formats.MODEL_FORMATS"


def build_formats(ctx: BuildContext) -> dict[str, dict[str, Any]]:
    """Build every format the settings ask for; returns ``{name: record}`` in registry order."""
    return {name: fmt.build(ctx) for name, fmt in FORMATS.items() if fmt.wanted(ctx.cfg)}


def is_built(record: dict[str, Any] | None) -> bool:
    """int8 records carry no status (quantisation either succeeds or raises); GPU ones say built/skipped/failed."""
    return record is not None and record.get("status", "built") == "built"
