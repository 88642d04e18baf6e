"""Eval stage: BEIR retrieval metrics for a model (base, fine-tuned, served) on a BEIR dataset.

- :func:`evaluate_encoder` — encode (through the embedding cache), search, pytrec_eval metrics, at the
  full dimension and at each Matryoshka dimension (truncate + renormalise, never re-encode);
- :func:`evaluate_model` — the same for a loaded SentenceTransformer;
- :func:`evaluate_bm25` — the lexical reference;
- :func:`evaluate_endpoint`, :func:`compare_within_tolerance` — a served model vs local figures;
- :func:`run_eval` — the pipeline stage (base vs fine-tuned, results.json, report.md, report.png).

The toolkit underneath (BEIR loading, encoders, cache, search, BM25, fusion, metrics) is
:mod:`embedtune.retrieval`; its most used names are re-exported here for scripts written against them.
"""

from embedtune.evaluate.bm25 import evaluate_bm25
from embedtune.evaluate.core import ModelResult, evaluate_encoder, evaluate_model
from embedtune.evaluate.endpoint import Violation, compare_within_tolerance, evaluate_endpoint
from embedtune.evaluate.stage import run_eval
from embedtune.retrieval.beir import BeirDataset, load_beir
from embedtune.retrieval.cache import EmbeddingCache, default_cache_dir
from embedtune.retrieval.encoders import EndpointEncoder, LocalEncoder, load_encoder, model_fingerprint
from embedtune.retrieval.metrics import RankingSpec, compute_metrics, evaluate_embeddings
from embedtune.retrieval.search import dense_search, to_run

__all__ = ["BeirDataset", "EmbeddingCache", "EndpointEncoder", "LocalEncoder", "ModelResult", "RankingSpec",
           "Violation", "compare_within_tolerance", "compute_metrics", "default_cache_dir", "dense_search",
           "evaluate_bm25", "evaluate_embeddings", "evaluate_encoder", "evaluate_endpoint", "evaluate_model",
           "load_beir", "load_encoder", "model_fingerprint", "run_eval", "to_run"]
