"""Which backend serves a ``--model`` argument: a run directory, an export folder, a model folder or name."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from embedtune.serve.backends import MANIFEST, Backend, BackendKind, OnnxBackend, OnnxPrecision, TorchBackend


@dataclass(frozen=True)
class ModelEntry:
    """A served model: the id clients use, where it comes from, and how to load it (lazily)."""

    name: str
    source: str
    load: Callable[[], Backend]


def split_model_arg(arg: str) -> tuple[str | None, str]:
    """``name=path`` -> (name, path); a bare path or built-in name -> (None, arg)."""
    match = re.fullmatch(r"([A-Za-z0-9][\w.:-]*)=(.+)", arg)
    return (match.group(1), match.group(2)) if match else (None, arg)


def export_folder(path: Path) -> Path | None:
    """The ONNX export inside ``path`` (a run directory) or ``path`` itself, if there is one."""
    for folder in (path, path / "export"):
        if (folder / MANIFEST).is_file() and any(folder.glob("model*.onnx")):
            return folder
    return None


def torch_folder(path: Path) -> Path | None:
    for folder in (path, path / "finetune" / "model"):
        if (folder / "modules.json").is_file() or (folder / "config.json").is_file():
            return folder
    return None


def default_name(spec: str) -> str:
    """A readable model id: the run's name for ``runs/x``, ``runs/x/export`` or ``runs/x/finetune/model``."""
    path = Path(spec)
    if not path.exists():
        return spec
    path = path.resolve()
    while path.name in {"export", "model", "finetune"} and path.parent != path:
        path = path.parent
    return path.name


def model_entry(arg: str, backend: BackendKind = "auto", precision: OnnxPrecision = "auto") -> ModelEntry:
    """Resolve a ``--model`` argument now (clear errors at start-up); load the weights later."""
    name, spec = split_model_arg(arg)
    name = name or default_name(spec)
    path = Path(spec).expanduser()
    onnx = export_folder(path) if path.is_dir() else None
    if backend == "onnx" or (backend == "auto" and onnx is not None):
        if onnx is None:
            raise FileNotFoundError(f"--backend onnx: no ONNX export ({MANIFEST} + model*.onnx) in {spec} "
                                    "or its export/ folder; run `embedtune export` first")
        return ModelEntry(name, str(onnx), lambda: OnnxBackend(onnx, precision))
    if path.is_dir():
        folder = torch_folder(path)
        if folder is None:
            raise FileNotFoundError(f"{spec} holds no model: expected a sentence-transformers/transformers "
                                    "folder, a run directory with finetune/model, or an ONNX export")
        return ModelEntry(name, str(folder), lambda: load_torch(str(folder), _declared_dims(path, folder)))
    return ModelEntry(name, spec, lambda: load_torch(spec, None))


def load_torch(spec: str, matryoshka_dims: list[int] | None) -> TorchBackend:
    from embedtune.models import load_model

    return TorchBackend(load_model(spec), matryoshka_dims)


def _declared_dims(*folders: Path) -> list[int] | None:
    """Matryoshka sizes a model declares in an ``embedtune.json`` next to it (or in its run's export)."""
    for folder in (*folders, folders[0] / "export"):
        manifest = folder / MANIFEST
        if manifest.is_file():
            dims = json.loads(manifest.read_text()).get("matryoshka_dims")
            if dims:
                return [int(d) for d in dims]
    return None
