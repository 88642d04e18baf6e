"""Hard-negative mining with the margin rule, exact and memory-bounded.

Why not ``sentence_transformers.util.mine_hard_negatives``: it works on (anchor, positive) text pairs, so
its ``relative_margin``/``absolute_margin`` compare each negative with the ONE positive of that row, not
with the query's weakest positive; it keys the corpus by text (two chunks with the same text become one,
so chunk ids are lost); and it has no way to forbid per-query candidates (chunks of the positives' own
documents, held-out documents' chunks). Those three are the point of this stage, so the scoring loop is
written here; it is a matrix product and ``torch.topk`` per block of queries.

The rule (NVIDIA's recipe): let ``p_min`` be the query's weakest positive score. A candidate can be a
negative only if it scores strictly below the threshold

- ``margin_type="perc"``: ``margin * p_min`` (default 0.95: anything within 5 % of a positive is treated
  as a probable false negative and skipped);
- ``margin_type="abs"``:  ``p_min - margin``.

Every positive is masked (not only the weakest), so is every chunk in ``excluded`` for that query, and the
``k`` best-scoring survivors are kept, best first, with their scores.

Memory: scores are computed for ``block`` queries at a time against all ``N`` candidates, so the peak is
the embeddings plus a few ``block x N`` float32 matrices (scores, the masked copy, topk's work space).
For 200,000 chunks and 50,000 queries at 384 dims: candidates 200,000 x 384 x 4 B = 307 MB, queries
50,000 x 384 x 4 B = 77 MB, one 256-query block 256 x 200,000 x 4 B = 205 MB, about 3 copies = 615 MB:
about 1.0 GB in all. Even at 1,024 dims (819 MB + 205 MB + 615 MB = 1.6 GB) it fits 4 GB, while the
full 50,000 x 200,000 score matrix would need 40 GB. The search stays exact (no approximate index).
Measured with ``bench/prep_mining.py`` (200,000 x 384 candidates, 1,024 queries, 2 busy cores): blocks of
256 peaked at 1.07 GB RSS (174 MB above the embeddings) in 28 s; one 1,024-query block at 2.38 GB in 29 s.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from embedtune.console import track

NEG_INF = float("-inf")

#: ``rescore(start, end, dense_block) -> block``: turns a block of dense scores (queries start..end against
#: all candidates) into the judge's scores, e.g. :class:`embedtune.prep.teacher.HybridTeacher`.
Rescore = Callable[[int, int, torch.Tensor], torch.Tensor]


@dataclass
class Mined:
    """Per query: negative candidate indices (best first), their scores, and the positives' scores."""

    neg_idx: list[list[int]] = field(default_factory=list)
    neg_scores: list[list[float]] = field(default_factory=list)
    pos_scores: list[list[float]] = field(default_factory=list)

    def extend(self, other: Mined) -> None:
        self.neg_idx += other.neg_idx
        self.neg_scores += other.neg_scores
        self.pos_scores += other.pos_scores


def thresholds(weakest_positive: torch.Tensor, margin: float, margin_type: str) -> torch.Tensor:
    """The score every negative must stay strictly below, per query."""
    if margin_type == "perc":
        return weakest_positive * margin
    if margin_type == "abs":
        return weakest_positive - margin
    raise ValueError(f"margin_type must be 'perc' or 'abs', got {margin_type!r}")


def mine_from_scores(scores: torch.Tensor | np.ndarray, positives: Sequence[Sequence[int]],
                     excluded: Sequence[Sequence[int]] | None = None, *, k: int, margin: float,
                     margin_type: str = "perc", inplace: bool = False) -> Mined:
    """Apply the margin rule to a ``queries x candidates`` score matrix (one block).

    ``inplace`` lets the blocked caller overwrite its fresh score block instead of copying it.
    """
    scores = torch.as_tensor(scores, dtype=torch.float32)
    n_rows, n_cands = scores.shape
    if len(positives) != n_rows:
        raise ValueError(f"{len(positives)} positive lists for {n_rows} score rows")
    if any(len(p) == 0 for p in positives):
        raise ValueError("every query needs at least one positive to set its threshold")
    pos_scores = [scores[i, list(p)].tolist() for i, p in enumerate(positives)]
    masked = scores if inplace else scores.clone()
    weakest = torch.tensor([min(s) for s in pos_scores], dtype=torch.float32)
    masked.masked_fill_(masked >= thresholds(weakest, margin, margin_type)[:, None], NEG_INF)
    _mask(masked, positives)
    if excluded is not None:
        _mask(masked, excluded)
    take = min(k, n_cands)
    if take == 0:
        return Mined([[] for _ in positives], [[] for _ in positives], pos_scores)
    values, idx = torch.topk(masked, take, dim=1)  # sorted, best first
    out = Mined(pos_scores=pos_scores)
    for row_vals, row_idx in zip(values.tolist(), idx.tolist(), strict=True):
        keep = [j for j, v in enumerate(row_vals) if v != NEG_INF]
        out.neg_idx.append([row_idx[j] for j in keep])
        out.neg_scores.append([row_vals[j] for j in keep])
    return out


def _mask(scores: torch.Tensor, columns: Sequence[Sequence[int]]) -> None:
    rows = [i for i, cols in enumerate(columns) for _ in cols]
    cols = [c for cs in columns for c in cs]
    if rows:
        scores[torch.tensor(rows), torch.tensor(cols)] = NEG_INF


def mine_negatives(query_emb: np.ndarray, cand_emb: np.ndarray, positives: Sequence[Sequence[int]],
                   excluded: Sequence[Sequence[int]] | None = None, *, k: int, margin: float,
                   margin_type: str = "perc", block: int = 256, progress: bool = True,
                   rescore: Rescore | None = None) -> Mined:
    """Mine over all candidates, ``block`` queries at a time (see the module docstring for memory).

    With ``rescore`` the margin rule, the ranking and the recorded scores are the judge's, not the dense ones.
    """
    queries = torch.from_numpy(np.ascontiguousarray(query_emb, dtype=np.float32))
    cands_t = torch.from_numpy(np.ascontiguousarray(cand_emb, dtype=np.float32)).T
    starts = range(0, len(queries), block)
    out = Mined()
    for start in track(starts, "mining negatives", total=len(starts)) if progress else starts:
        end = start + block
        with torch.inference_mode():  # the block is a fresh tensor: mask it in place, no copy
            scores = queries[start:end] @ cands_t
            if rescore is not None:
                scores = rescore(start, start + len(scores), scores)
            out.extend(mine_from_scores(scores, positives[start:end],
                                        None if excluded is None else excluded[start:end],
                                        k=k, margin=margin, margin_type=margin_type, inplace=True))
    return out


def random_fill(chosen: list[int], forbidden: set[int], n_candidates: int, need: int,
                rng: random.Random) -> list[int]:
    """Up to ``need`` more distinct candidate indices, none chosen or forbidden, drawn uniformly.

    Used when the margin rule left too few negatives. Draws by rejection while the pool is large and
    falls back to listing the allowed indices when it is nearly exhausted, so it terminates either way.
    """
    taken = set(chosen) | forbidden
    extra: list[int] = []
    attempts = 0
    while len(extra) < need and attempts < 20 * need:
        attempts += 1
        j = rng.randrange(n_candidates) if n_candidates else 0
        if n_candidates and j not in taken:
            taken.add(j)
            extra.append(j)
    if len(extra) < need:
        rest = [j for j in range(n_candidates) if j not in taken]
        extra += rng.sample(rest, min(need - len(extra), len(rest)))
    return extra
