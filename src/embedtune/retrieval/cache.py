"""On-disk cache of embeddings, keyed by everything that determines them.

Key = (model weights fingerprint, prompt, max_seq_length, query/passage, the exact texts in order). So a
base-vs-fine-tuned comparison, a rerun with ``--force`` or a Matryoshka sweep (encoded once at full
dimension, truncated afterwards) never encodes the same corpus with the same model twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from embedtune.artifacts import atomic_open, write_json
from embedtune.console import log
from embedtune.retrieval.encoders import Encoder, Kind, LocalEncoder, model_fingerprint


def texts_fingerprint(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        h.update(t.encode("utf-8", "surrogatepass"))
        h.update(b"\0")  # so that ["ab", "c"] and ["a", "bc"] differ
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$EMBEDTUNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/embedtune/embeddings`` (``~/.cache/...``)."""
    if env := os.environ.get("EMBEDTUNE_CACHE_DIR"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "embedtune" / "embeddings"


class EmbeddingCache:
    """``<root>/<key>.npy`` (float32) beside ``<key>.json`` (what the key stands for, for a person)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def key(self, parts: dict[str, object], kind: Kind, texts: Sequence[str]) -> str:
        blob = json.dumps({**parts, "kind": kind, "texts": texts_fingerprint(texts)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:40]

    def load(self, key: str, n: int) -> np.ndarray | None:
        path = self.root / f"{key}.npy"
        if not path.is_file():
            return None
        try:
            emb = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:  # a damaged file is a miss, never a wrong answer
            log.warning("ignoring unreadable cache file %s (%s)", path, exc)
            return None
        return emb if emb.ndim == 2 and len(emb) == n else None

    def save(self, key: str, emb: np.ndarray, meta: dict[str, object]) -> None:
        with atomic_open(self.root / f"{key}.npy", "wb", encoding=None) as fh:
            np.save(fh, np.ascontiguousarray(emb, dtype=np.float32), allow_pickle=False)
        write_json(self.root / f"{key}.json", {**meta, "rows": int(emb.shape[0]), "dim": int(emb.shape[1])})


    def lookup(self, encoder: Encoder, texts: Sequence[str], kind: Kind) -> np.ndarray | None:
        """``encoder``'s cached vectors of exactly ``texts``, or None (never encodes)."""
        parts = encoder.cache_key(kind)
        return None if parts is None else self.load(self.key(parts, kind, texts), len(texts))


def stage_cache(cache_dir: str | None, run_root: str | Path) -> EmbeddingCache:
    """The cache a stage of a run reads and fills: ``eval.cache_dir`` when set, else the run's own."""
    return EmbeddingCache(Path(cache_dir)) if cache_dir else run_embedding_cache(run_root)


def encode_cached(encoder: Encoder, texts: Sequence[str], kind: Kind,
                  cache: EmbeddingCache | None = None, what: str = "") -> np.ndarray:
    """``encoder.encode(texts, kind)``, served from / stored in ``cache`` when the encoder allows it."""
    parts = encoder.cache_key(kind) if cache is not None else None
    if cache is None or parts is None:
        return encoder.encode(texts, kind)
    if (emb := cache.lookup(encoder, texts, kind)) is not None:
        cache.hits += 1
        log.info("%s: %d %s embeddings from the cache", encoder.label, len(texts), kind)
        return emb
    key = cache.key(parts, kind, texts)
    cache.misses += 1
    emb = encoder.encode(texts, kind)
    cache.save(key, emb, {**parts, "kind": kind, "what": what, "label": encoder.label})
    return emb


def run_embedding_cache(run_root: str | Path) -> EmbeddingCache:
    """The run-wide cache that sdg's round-trip filter and prep's mining share (same model, same chunks)."""
    return EmbeddingCache(Path(run_root) / "cache" / "embeddings")


def encode_passages_cached(model, model_path: str | Path, texts: Sequence[str],
                           cache: EmbeddingCache | None, what: str = "") -> np.ndarray:
    """Passage embeddings of ``model`` (weights at ``model_path``), from ``cache`` when it has them."""
    encoder = LocalEncoder(model, model_fingerprint(model_path), label=what or "model")
    return encode_cached(encoder, texts, "passage", cache, what)
