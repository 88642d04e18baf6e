"""Export stage: ONNX with pooling, normalisation and Matryoshka truncation in the graph, int8, parity.

- :func:`export_onnx` — library function, any SentenceTransformer / folder / spec + ``ExportConfig`` -> serving
  folder, with each derived format of :data:`embedtune.export.formats.FORMATS` the settings ask for;
- :func:`run_export` — the pipeline stage (fine-tuned model if finetune completed, else the base model);
- :class:`~embedtune.retrieval.onnx.OnnxEncoder` (re-exported) — run an exported folder with onnxruntime
  only; it lives in the retrieval library because the server and the index stage use it too.

Names are imported lazily: ``import embedtune.export`` stays light until a name is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embedtune.export.onnx_export import ExportResult, export_onnx
    from embedtune.export.stage import ParityError, run_export
    from embedtune.retrieval.onnx import OnnxEncoder

__all__ = ["ExportResult", "OnnxEncoder", "ParityError", "export_onnx", "run_export"]

_LOCATIONS = {
    "ExportResult": "embedtune.export.onnx_export",
    "export_onnx": "embedtune.export.onnx_export",
    "OnnxEncoder": "embedtune.retrieval.onnx",
    "ParityError": "embedtune.export.stage",
    "run_export": "embedtune.export.stage",
}


def __getattr__(name: str) -> Any:
    if name not in _LOCATIONS:
        raise AttributeError(f"module 'embedtune.export' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LOCATIONS[name]), name)
