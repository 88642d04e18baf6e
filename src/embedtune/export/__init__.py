"""Export stage: the run's model (fine-tuned if finetune completed, else the base) as an ONNX serving folder.

- :func:`run_export` — the pipeline stage (``stage.py``): export, int8, parity checked, ``parity.json``;
- :func:`export_onnx` — the converter it drives (:mod:`embedtune.convert`, a library the filters use too);
- :class:`~embedtune.retrieval.onnx.OnnxEncoder` — run an exported folder with onnxruntime only.
"""

from __future__ import annotations

from embedtune.convert.onnx_export import ExportResult, export_onnx
from embedtune.export.stage import ParityError, run_export
from embedtune.retrieval.onnx import OnnxEncoder

__all__ = ["ExportResult", "OnnxEncoder", "ParityError", "export_onnx", "run_export"]
