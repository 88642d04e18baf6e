"""Which precision of an export folder this machine serves: the fastest whose quality the export vouched for.

Above the file registry (:mod:`embedtune.retrieval.formats`) and the speed probe
(:mod:`embedtune.retrieval.speed_probe`), which both only describe; the server and the retrieval encoders ask
here.
"""

from __future__ import annotations

from pathlib import Path

from embedtune.console import log
from embedtune.retrieval import speed_probe
from embedtune.retrieval.formats import MODEL_FORMATS, model_file, serving_order
from embedtune.retrieval.metadata import int8_parity_failure


def pick_precision(folder: Path, on_gpu: bool, precision: str = "auto") -> str:
    """The precision this machine serves from an export folder: ``precision``, or for ``auto`` the first of
    :func:`serving_order` the folder holds, leaving out an int8 graph that failed the export's parity gate
    (kept on disk for inspection; asking for int8 by name still gets it), and on a CPU without int8 dot
    products an int8 graph that is not faster here (:mod:`embedtune.retrieval.speed_probe`). FileNotFoundError
    names the files looked for."""
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
