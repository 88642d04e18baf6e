"""The retrieval toolkit below the stages: what sdg, prep, eval, export, index, serve and the platform share.

- :mod:`~embedtune.retrieval.beir` — strict BEIR loading;
- :mod:`~embedtune.retrieval.encoders` — texts to L2-normalised vectors: a local model (torch),
  an ONNX export (:mod:`~embedtune.retrieval.onnx`) or an OpenAI-compatible endpoint, one interface;
- :mod:`~embedtune.retrieval.cache` — the on-disk embedding cache;
- :mod:`~embedtune.retrieval.search` — exact (blocked torch) or faiss inner-product top-k;
- :mod:`~embedtune.retrieval.bm25` — the BM25 index; :mod:`~embedtune.retrieval.fusion` — dense + BM25;
- :mod:`~embedtune.retrieval.metrics` — pytrec_eval metrics of a run;
- :mod:`~embedtune.retrieval.ids`, :mod:`~embedtune.retrieval.metadata` — passage ids, ``embedtune.json``.

Names are imported lazily so that importing one light piece (ids, metadata) never pulls in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LOCATIONS = {
    "BeirDataset": "beir", "load_beir": "beir",
    "EmbeddingCache": "cache", "default_cache_dir": "cache", "encode_cached": "cache",
    "Encoder": "encoders", "LocalEncoder": "encoders", "EndpointEncoder": "encoders", "OnnxModelEncoder": "encoders",
    "load_encoder": "encoders", "model_fingerprint": "encoders", "normalize": "encoders",
    "OnnxEncoder": "onnx",
    "dense_search": "search", "search": "search", "to_run": "search",
    "BM25Index": "bm25", "fuse": "fusion", "hybrid_search": "fusion",
    "compute_metrics": "metrics", "evaluate_embeddings": "metrics", "RankingSpec": "metrics",
    "passage_id": "ids", "METADATA_FILE": "metadata", "read_metadata": "metadata", "matryoshka_dims": "metadata",
}
__all__ = sorted(_LOCATIONS)


def __getattr__(name: str) -> Any:
    if name not in _LOCATIONS:
        raise AttributeError(f"module 'embedtune.retrieval' has no attribute {name!r}")
    return getattr(importlib.import_module(f"embedtune.retrieval.{_LOCATIONS[name]}"), name)
