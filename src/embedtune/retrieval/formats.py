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

from embedtune.console import log


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


def pick_precision(folder: Path, on_gpu: bool, precision: str = "auto") -> str:
    """The precision this machine serves from an export folder: ``precision``, or for ``auto`` the first of
    :func:`serving_order` the folder holds, leaving out an int8 graph that failed the export's parity gate
    (kept on disk for inspection; asking for int8 by name still gets it), and on a CPU without int8 dot
    products an int8 graph that is not faster here (:mod:`embedtune.retrieval.speed_probe`). FileNotFoundError
    names the files looked for."""
    from embedtune.retrieval.metadata import int8_parity_failure

    order = serving_order(on_gpu) if precision == "auto" else [precision]
    if precision == "auto" and model_file(folder, "int8").is_file() and (failure := int8_parity_failure(folder)):
        log.warning("%s: using fp32 instead (ask for int8 by name to use it anyway)", failure)
        order = [p for p in order if p != "int8"]
    elif precision == "auto" and not on_gpu and _int8_too_slow_here(folder):
        order = [p for p in order if p != "int8"]
    found = next((p for p in order if model_file(folder, p).is_file()), None)
    if found is None:
        raise FileNotFoundError(f"{folder} has no {' or '.join(MODEL_FORMATS[p].file for p in order)}")
    return found


def _int8_too_slow_here(folder: Path) -> bool:
    from embedtune.retrieval import speed_probe

    if not (model_file(folder, "int8").is_file() and model_file(folder, "fp32").is_file()
            and speed_probe.probe_wanted()):
        return False
    probe = speed_probe.int8_speed(folder)
    if probe.int8_pays:
        log.info("%s: serving int8", probe.line())
        return False
    log.info("%s, under the %.1fx that would pay for its quality loss: serving fp32 (ask for int8 by name to "
             "use it anyway)", probe.line(), speed_probe.MIN_SPEEDUP)
    return True
