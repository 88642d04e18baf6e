"""The files of an export folder, one row per precision: the contract the export stage writes and the
server, the index stage, the retrieval encoders and the platform read.

How each file is built lives with the converter (:mod:`embedtune.convert.formats`, keyed by the same
names); this table is what every reader needs: the file name, the device it is for, and whether
onnxruntime loads it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args


@dataclass(frozen=True)
class ModelFile:
    precision: str
    file: str
    device: Literal["any", "cpu", "gpu"]
    onnxruntime: bool  # loadable by onnxruntime (OnnxEncoder, serve's ONNX backend); a TensorRT plan is not


MODEL_FORMATS: dict[str, ModelFile] = {f.precision: f for f in (
    ModelFile("fp32", "model.onnx", "any", True),       # always built; the reference the others are checked against
    ModelFile("int8", "model.int8.onnx", "cpu", True),  # dynamic int8: the CPU speed-up
    ModelFile("fp16", "model.fp16.onnx", "gpu", True),
    ModelFile("fp8", "model.fp8.plan", "gpu", False),   # TensorRT engine, specific to the GPU that built it
)}

# precision -> file name of the formats onnxruntime runs.
ONNX_FILES: dict[str, str] = {p: f.file for p, f in MODEL_FORMATS.items() if f.onnxruntime}
#: The same precisions as a type (OnnxEncoder, the retrieval encoders); a row added above must be named here.
OnnxPrecision = Literal["fp32", "int8", "fp16"]
assert set(get_args(OnnxPrecision)) == set(ONNX_FILES), "OnnxPrecision and MODEL_FORMATS disagree"


def model_file(folder: Path, precision: str) -> Path:
    return Path(folder) / MODEL_FORMATS[precision].file


def serving_order(on_gpu: bool) -> list[str]:
    """Precisions ``auto`` tries, best first: int8 is the CPU speed-up; on a GPU the fp32 graph is faster."""
    return ["fp32", "int8"] if on_gpu else ["int8", "fp32"]
