"""Which backend serves a ``--model`` argument: a run directory, an export folder, a model folder or name."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from embedtune.config import ServePrecision
from embedtune.retrieval.deployment import deployed_model
from embedtune.retrieval.encoders import export_folder, served_model
from embedtune.retrieval.metadata import METADATA_FILE, matryoshka_dims
from embedtune.serve.backends import Backend, BackendKind, OnnxBackend, TorchBackend


@dataclass(frozen=True)
class ModelEntry:
    """A served model: the id clients use, where it comes from, and how to load it (lazily)."""

    name: str
    source: str
    load: Callable[[], Backend]
    index: Path | None = None  # a run's deploy/ (index) folder: /v1/search over it


def split_model_arg(arg: str) -> tuple[str | None, str]:
    """``name=path`` -> (name, path); a bare path or built-in name -> (None, arg)."""
    match = re.fullmatch(r"([A-Za-z0-9][\w.:-]*)=(.+)", arg)
    return (match.group(1), match.group(2)) if match else (None, arg)


def default_name(spec: str) -> str:
    """A readable model id: the run's name for ``runs/x``, ``runs/x/export`` or ``runs/x/finetune/model``."""
    path = Path(spec)
    if not path.exists():
        return spec
    path = path.resolve()
    while path.name in {"export", "model", "finetune"} and path.parent != path:
        path = path.parent
    return path.name


def model_entry(arg: str, backend: BackendKind = "auto", precision: ServePrecision = "auto",
                index: Path | None = None) -> ModelEntry:
    """Resolve a ``--model`` argument now (clear errors at start-up); load the weights later.

    A run directory with an index (``embedtune deploy``) gets ``/v1/search`` over it; ``index`` names one
    explicitly (a run directory or its ``index/`` folder).
    """
    entry = _model_entry(arg, backend, precision)
    found = _index_folder(index) if index is not None else _index_folder(Path(split_model_arg(arg)[1]), quiet=True)
    return replace(entry, index=found)


def _index_folder(path: Path, quiet: bool = False) -> Path | None:
    from embedtune.retrieval.deployment import INFO_FILE, index_dir

    folder = index_dir(path.expanduser())
    if (folder / INFO_FILE).is_file():
        return folder
    if quiet:
        return None
    raise FileNotFoundError(f"--index {path}: no {INFO_FILE} there or in its deploy/ folder; run `embedtune deploy`")


def _model_entry(arg: str, backend: BackendKind, precision: ServePrecision) -> ModelEntry:
    name, spec = split_model_arg(arg)
    name = name or default_name(spec)
    path = Path(spec).expanduser()
    if backend == "onnx" and (not path.is_dir() or export_folder(path) is None):
        raise FileNotFoundError(f"--backend onnx: no ONNX export ({METADATA_FILE} + model*.onnx) in {spec} "
                                "or its export/ folder; run `embedtune export` first")
    if not path.is_dir():
        return ModelEntry(name, spec, lambda: load_torch(spec, None))
    # A deployed run serves what its release gate chose (the weights that filled its index); otherwise the
    # retrieval library decides which weights a folder holds.
    served = deployed_model(path) if backend == "auto" and precision == "auto" else None
    served = served or served_model(path, prefer_onnx=backend != "torch", precision=precision)
    folder = Path(served.path)
    if served.kind == "onnx":
        return ModelEntry(name, str(folder), lambda: OnnxBackend(folder, served.precision))  # type: ignore[arg-type]
    return ModelEntry(name, str(folder), lambda: load_torch(str(folder), _declared_dims(path, folder)))


def load_torch(spec: str, matryoshka_dims: list[int] | None) -> TorchBackend:
    from embedtune.models import load_model

    return TorchBackend(load_model(spec), matryoshka_dims)


def _declared_dims(*folders: Path) -> list[int] | None:
    """Matryoshka sizes a model declares in its ``embedtune.json`` (or in its run's export)."""
    return matryoshka_dims(*folders, folders[0] / "export")
