"""A deployed index as its readers see it: ``deploy/index.json`` (where the collection is, which model
filled it so a server can refuse to answer with a different one, how hybrid search fuses, which search mode
the release gate chose) and the searcher that `/v1/search`, `embedtune search` and `embedtune eval --index`
share.

Written by the deploy stage (:mod:`embedtune.deploy`); read here, below every stage and the server. Paths
inside a run (the model's folder, the Lite file) are stored relative to the run, so a run directory can be
moved or read from any working directory.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from embedtune.artifacts import ArtifactError, read_json
from embedtune.retrieval import milvus

INFO_FILE = "index.json"
STATS_FILE = "dense_stats.npz"


class IndexInfo(milvus.SearchSettings):
    """``deploy/index.json``: what was indexed, by which model, and how searches fuse (the inherited fields)."""

    collection: str  # the physical collection this build wrote
    alias: str  # the name searches use; swapped to a new collection by the next build
    uri: str  # Milvus Lite file (relative to the index folder when inside it) or a server URI
    token_env: str | None = None
    chunks: int
    dimension: int
    model_kind: str  # onnx | torch
    model_path: str
    model_precision: str | None = None
    model_label: str = ""
    model_fingerprint: str = ""
    bm25: bool = True
    analyzer: dict[str, Any] = {}
    mode: str = "hybrid"  # the search mode the release gate deployed: what a request gets by default

    def resolved_uri(self, index_dir: Path) -> str:
        if milvus.is_lite(self.uri) and not Path(self.uri).is_absolute():
            return str(index_dir / self.uri)
        return self.uri

    def resolved_model_path(self, index_dir: Path) -> str:
        """The model's folder: stored relative to the run directory (the index folder's parent)."""
        path = Path(self.model_path)
        return self.model_path if path.is_absolute() else str((index_dir.parent / path).resolve())


INDEX_FOLDERS = ("deploy", "index")  # the deploy stage's folder; "index" for runs made before it existed


def index_dir(run_or_index: str | Path) -> Path:
    """A run directory's ``deploy/`` folder, or the folder itself when given one."""
    path = Path(run_or_index)
    if (path / INFO_FILE).is_file():
        return path
    return next((path / f for f in INDEX_FOLDERS if (path / f / INFO_FILE).is_file()), path / INDEX_FOLDERS[0])


def relative_to_run(path: str | Path, run_root: Path) -> str:
    """``path`` relative to the run directory when it lies inside it (else absolute)."""
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(run_root.resolve()))
    except ValueError:
        return str(resolved)


def read_info(run_or_index: str | Path) -> IndexInfo:
    folder = index_dir(run_or_index)
    path = folder / INFO_FILE
    if not path.is_file():
        raise ArtifactError(f"{run_or_index} has no index ({path} is missing): run `embedtune deploy` first")
    info = IndexInfo.model_validate(read_json(path))
    return info.model_copy(update={"model_path": info.resolved_model_path(folder)})


def deployed_model(run_root: str | Path):
    """The model a run's deployment serves (what its release gate chose and its index holds), or None when
    the run has not been deployed. `embedtune serve --model RUN` and the platform serve this, so what answers
    /v1/embeddings is what filled the index."""
    from embedtune.retrieval.encoders import ServedModel

    root = Path(run_root)
    if not any((root / f / INFO_FILE).is_file() for f in INDEX_FOLDERS):
        return None
    info = read_info(root)
    return ServedModel(info.model_kind, info.model_path, info.model_precision, info.model_label)  # type: ignore[arg-type]


def settings_of(info: IndexInfo) -> milvus.SearchSettings:
    return milvus.SearchSettings.model_validate(info.model_dump(include=set(milvus.SearchSettings.model_fields)))


def connect_index(run_or_index: str | Path, timeout: float = 30.0) -> tuple[IndexInfo, object]:
    """The index's description and a connected client (token from the env var the index names)."""
    info = read_info(run_or_index)
    token = os.environ.get(info.token_env) if info.token_env else None
    return info, milvus.connect(info.resolved_uri(index_dir(run_or_index)), token, timeout)


def searcher_for(run_or_index: str | Path, embed: Callable[[Sequence[str]], np.ndarray],
                 timeout: float = 30.0) -> milvus.MilvusSearcher:
    """A searcher over the index whose queries ``embed`` turns into vectors (the server's loaded model)."""
    info, client = connect_index(run_or_index, timeout)
    # A collection reopened by another process (or after a server restart) starts released: load it.
    client.load_collection(info.alias, timeout=timeout)
    stats_path = index_dir(run_or_index) / STATS_FILE
    stats = milvus.DenseStats.load(stats_path) if stats_path.is_file() else None
    return milvus.MilvusSearcher(client, info.alias, embed, info.dimension, settings_of(info), stats)


def open_searcher(run_or_index: str | Path, model: object | None = None, batch_size: int = 32,
                  timeout: float = 30.0) -> milvus.MilvusSearcher:
    """A searcher that embeds queries with the same model (and precision) that filled the index.

    ``model``: the run's base model spec (only needed when the index was filled by the base model); by
    default read from the run's ``recipe.yaml``.
    """
    from embedtune.retrieval.encoders import ServedModel

    info = read_info(run_or_index)
    served = ServedModel(info.model_kind, info.model_path, info.model_precision, info.model_label)  # type: ignore[arg-type]
    encoder = served.load(model if model is not None else _run_model(run_or_index, info), batch_size)
    return searcher_for(run_or_index, lambda texts: encoder.encode(texts, "query"), timeout)


def _run_model(run_or_index: str | Path, info: IndexInfo) -> object:
    from embedtune.config import load_recipe

    recipe_file = index_dir(run_or_index).parent / "recipe.yaml"
    if recipe_file.is_file():
        return load_recipe(recipe_file).model
    return info.model_path  # the base model's folder itself
