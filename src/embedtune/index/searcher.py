"""Open a run's index for searching: the store, the fusion settings and the model that filled it."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from embedtune.index.info import STATS_FILE, IndexInfo, index_dir, read_info
from embedtune.retrieval import milvus


def settings_of(info: IndexInfo) -> milvus.SearchSettings:
    return milvus.SearchSettings(bm25_weight=info.bm25_weight, fusion=info.fusion,  # type: ignore[arg-type]
                                 candidates=info.candidates, lexical_candidates=info.lexical_candidates)


def connect_index(run_or_index: str | Path, timeout: float = 30.0) -> tuple[IndexInfo, object]:
    """The index's description and a connected client (token from the env var the index names)."""
    info = read_info(run_or_index)
    token = os.environ.get(info.token_env) if info.token_env else None
    return info, milvus.connect(info.resolved_uri(index_dir(run_or_index)), token, timeout)


def searcher_for(run_or_index: str | Path, embed: Callable[[Sequence[str]], np.ndarray],
                 timeout: float = 30.0) -> milvus.MilvusSearcher:
    """A searcher over the index whose queries ``embed`` turns into vectors (the server's loaded model)."""
    info, client = connect_index(run_or_index, timeout)
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
