"""Who judges the candidates in prep: the base model alone (``dense``) or fused with BM25 (``hybrid``).

Why a hybrid judge: on a new domain the base model misses exact terms (gene names, product codes,
abbreviations) that BM25 matches, and BM25 misses the paraphrases the model catches, so their fusion beats
both. Measured on SciFact's real test claims (``bench/domain_adaptation.py``): MiniLM 0.645 nDCG@10, BM25
0.662, the fusion below at weight 0.5 0.708. A better judge picks truer hard negatives (what it ranks high
that is not the answer) and gives the finetune stage truer score margins to distil
(``finetune.loss: margin_mse``), which is how the model learns what BM25 knew.

The fusion is :func:`embedtune.retrieval.fusion.fuse`: it stays in cosine units, so the margin rule (95 % of
the weakest positive) and the margins the student is trained to reproduce mean what they mean for the
dense judge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from embedtune.console import log
from embedtune.retrieval.fusion import fuse

#: Languages written without spaces between words: bm25s's word tokenizer would take a whole clause as
#: one term, so the hybrid judge falls back to the dense one for them.
UNSPACED_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "km", "my"})
#: Languages with a bm25s stopword list (ISO 639-1).
BM25S_STOPWORDS = frozenset({"en", "de", "nl", "fr", "es", "pt", "it", "ru", "sv", "no", "tr", "ko", "da"})


class HybridTeacher:
    """Rescores blocks of dense query x candidate scores with BM25 (a ``rescore`` hook for mining)."""

    def __init__(self, queries: Sequence[str], passages: Sequence[str], bm25_weight: float,
                 language: str = "en"):
        from embedtune.retrieval.bm25 import BM25Index

        self.queries = list(queries)
        self.bm25_weight = bm25_weight
        self.index = BM25Index(passages, stopwords=language if language in BM25S_STOPWORDS else None)

    def __call__(self, start: int, end: int, dense: torch.Tensor) -> torch.Tensor:
        lexical = torch.from_numpy(self.index.scores(self.queries[start:end]))
        return fuse(dense, lexical, self.bm25_weight)


def make_teacher(kind: str, queries: Sequence[str], passages: Sequence[str], bm25_weight: float,
                 language: str) -> HybridTeacher | None:
    """The rescoring hook for ``prep.teacher`` (None: the dense scores as they are)."""
    if kind == "dense" or bm25_weight == 0:
        return None
    if language in UNSPACED_LANGUAGES:
        log.warning("prep.teacher=hybrid: BM25 cannot split %r text into words; judging with the dense "
                    "model alone", language)
        return None
    return HybridTeacher(queries, passages, bm25_weight, language)


def score_label(kind: str, bm25_weight: float, language: str) -> str:
    """What prep's scores are, as its report and plot name them (the teacher that judged the negatives)."""
    if kind == "dense" or bm25_weight == 0 or language in UNSPACED_LANGUAGES:
        return "base-model cosine"
    return f"hybrid teacher score (base-model cosine fused with BM25, weight {bm25_weight})"
