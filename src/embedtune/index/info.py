"""``index/index.json``: what a reader of the index needs — where the collection is, which model filled it
(so a server can refuse to answer with a different one), and how hybrid search fuses."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel

from embedtune.artifacts import ArtifactError, read_json

INFO_FILE = "index.json"
STATS_FILE = "dense_stats.npz"


class IndexInfo(BaseModel):
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
    bm25_weight: float = 0.2
    fusion: str = "zscore"
    candidates: int = 100
    lexical_candidates: int = 1000
    analyzer: dict[str, Any] = {}

    def resolved_uri(self, index_dir: Path) -> str:
        from embedtune.retrieval.milvus import is_lite

        if is_lite(self.uri) and not Path(self.uri).is_absolute():
            return str(index_dir / self.uri)
        return self.uri


def index_dir(run_or_index: str | Path) -> Path:
    """A run directory's ``index/`` folder, or the folder itself when given one."""
    path = Path(run_or_index)
    return path if (path / INFO_FILE).is_file() else path / "index"


def read_info(run_or_index: str | Path) -> IndexInfo:
    folder = index_dir(run_or_index)
    path = folder / INFO_FILE
    if not path.is_file():
        raise ArtifactError(f"{run_or_index} has no index ({path} is missing): run `embedtune index` first")
    return IndexInfo.model_validate(read_json(path))
