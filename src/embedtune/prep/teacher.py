"""Who judges the candidates in prep: the base model alone (``dense``) or fused with BM25 (``hybrid``).

Why a hybrid judge: on a new domain the base model misses exact terms (gene names, product codes,
abbreviations) that BM25 matches, and BM25 misses the paraphrases the model catches, so their fusion beats
both. Measured on SciFact's real test claims (``bench/domain_adaptation.py``): MiniLM 0.645 nDCG@10, BM25
0.662, the fusion below at weight 0.5 0.708. A better judge picks truer hard negatives (what it ranks high
that is not the answer) and gives the finetune stage truer score margins to distil
(``finetune.loss: margin_mse``), which is how the model learns what BM25 knew.

The fusion is :class:`embedtune.retrieval.fusion.HybridRescorer`: it stays in cosine units, so the margin rule (95 % of
the weakest positive) and the margins the student is trained to reproduce mean what they mean for the
dense judge.
"""

from __future__ import annotations

from collections.abc import Sequence

from embedtune.retrieval.bm25 import UNSPACED_LANGUAGES
from embedtune.retrieval.fusion import HybridRescorer, hybrid_rescorer


def make_teacher(kind: str, queries: Sequence[str], passages: Sequence[str], bm25_weight: float,
                 language: str) -> HybridRescorer | None:
    """The rescoring hook for ``prep.teacher`` (None: the dense scores as they are)."""
    if kind == "dense":
        return None
    return hybrid_rescorer(queries, passages, bm25_weight, language, "prep.teacher=hybrid")


def score_label(kind: str, bm25_weight: float, language: str) -> str:
    """What prep's scores are, as its report and plot name them (the teacher that judged the negatives)."""
    if kind == "dense" or bm25_weight == 0 or language in UNSPACED_LANGUAGES:
        return "base-model cosine"
    return f"hybrid teacher score (base-model cosine fused with BM25, weight {bm25_weight})"
