"""The model metadata file, ``embedtune.json``, beside a fine-tuned model or in an ONNX export folder.

Written by the finetune stage (``{"matryoshka_dims"}``) and the export stage (dimension, Matryoshka dims,
max length, prompts, graph inputs and output, opset, pooling, source). Read by the server, the index
stage and the export runtime through the functions here, so there is one name and one reader.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedtune.artifacts import ArtifactError, read_json, write_json

METADATA_FILE = "embedtune.json"


def metadata_path(folder: str | Path) -> Path:
    return Path(folder) / METADATA_FILE


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """The folder's metadata; ``{}`` when it has none. A malformed file is an error naming it."""
    path = metadata_path(folder)
    if not path.is_file():
        return {}
    data = read_json(path)
    if not isinstance(data, dict):
        raise ArtifactError(f"{path}: expected a JSON object")
    return data


def write_metadata(folder: str | Path, metadata: dict[str, Any]) -> Path:
    return write_json(metadata_path(folder), metadata)


def matryoshka_dims(*folders: str | Path) -> list[int] | None:
    """The Matryoshka sizes the first folder with metadata declares (None: not declared)."""
    for folder in folders:
        dims = read_metadata(folder).get("matryoshka_dims")
        if dims:
            return sorted({int(d) for d in dims}, reverse=True)
    return None


PARITY_FILE = "parity.json"


def int8_parity_failure(folder: str | Path) -> str | None:
    """Why the folder's int8 graph must not be deployed by default, or None when nothing says so.

    The export stage writes ``parity.json``; with ``export.allow_parity_failure`` it keeps an int8 graph whose
    retrieval drifted beyond the recipe's tolerances from fp32 (dynamic int8 of a Llama decoder does: one
    per-tensor activation scale cannot hold its outlier channels). That file stays on disk for inspection, but
    the server and the index stage pick fp32 unless int8 is asked for by name.
    """
    path = Path(folder) / PARITY_FILE
    if not path.is_file():
        return None
    report = read_json(path)
    retrieval = ((report.get("int8_vs_fp32") or {}).get("retrieval") or {}) if isinstance(report, dict) else {}
    if retrieval.get("passed", True):
        return None
    failures = "; ".join(retrieval.get("failures") or []) or "see the file"
    return f"int8 failed the export's retrieval parity gate ({failures}; {path})"
