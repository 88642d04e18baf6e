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
The measured peak is in the README (``bench/prep_mining.py``).

Below the rule: the assembly the prep stage runs (:func:`build_examples`): embed, mask, mine, top up.
"""

from __future__ import annotations

import contextlib
import random
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from embedtune.artifacts import ArtifactError
from embedtune.config import PrepConfig, Recipe
from embedtune.console import log, track
from embedtune.prep.split import Split
from embedtune.prep.teacher import make_teacher
from embedtune.retrieval.cache import EmbeddingCache, encode_passages_cached
from embedtune.schemas import Chunk, SyntheticQuery, TrainExample

NEG_INF = float("-inf")

#: ``rescore(start, end, dense_block) -> block``: turns a block of dense scores (queries start..end against
#: all candidates) into the judge's scores, e.g. :class:`embedtune.retrieval.fusion.HybridRescorer`.
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


# ------------------------------------------------------------------------------------------ assembly


def build_examples(recipe: Recipe, split: Split, chunks: list[Chunk],
                   cache: EmbeddingCache | None = None) -> tuple[list[TrainExample], dict]:
    """Embed the training queries and candidate chunks with the base model, mine, fill, assemble.

    All chunks are embedded through ``cache`` (the run's: sdg's round-trip filter already embedded the
    same chunks with the same model and backend), and the candidate pool takes its rows from them.
    """
    cfg = recipe.prep
    pool = [c for c in chunks if cfg.test_chunks_as_negatives or c.doc_id in split.train_docs]
    positives, excluded = candidate_masks(split.train, pool, cfg.exclude_same_document)

    q_emb, all_emb = _base_embeddings(recipe, [q.text for q in split.train], [c.passage for c in chunks], cache)
    row = {c.id: i for i, c in enumerate(chunks)}
    p_emb = all_emb[[row[c.id] for c in pool]]
    teacher = make_teacher(cfg.teacher, [q.text for q in split.train], [c.passage for c in pool], cfg.bm25_weight,
                           recipe.corpus.language)
    mined = mine_negatives(q_emb, p_emb, positives, excluded, k=cfg.hard_negatives_to_mine,
                           margin=cfg.margin, margin_type=cfg.margin_type, block=cfg.mining_query_block,
                           rescore=teacher)
    counts = {"candidates": len(pool), "mined_negatives": sum(map(len, mined.neg_idx)),
              "short_of_negatives": sum(len(n) < cfg.negatives_used for n in mined.neg_idx)}
    counts.update(fill_missing(mined, positives, excluded, q_emb, p_emb, cfg, teacher))
    if counts["short_of_negatives"]:
        log.info("%d of %d training queries had fewer than %d negatives under the margin rule (%s)",
                 counts["short_of_negatives"], len(split.train), cfg.negatives_used, cfg.fill_missing)
    examples = [_example(q, pool, positives[i], mined, i) for i, q in enumerate(split.train)
                if mined.neg_idx[i] is not None]
    return examples, counts


def _base_embeddings(recipe: Recipe, queries: list[str], chunks: list[str],
                     cache: EmbeddingCache | None) -> tuple[np.ndarray, np.ndarray]:
    """The base model's query and chunk embeddings, by the backend sdg's filters used (so the chunks come
    from the run cache sdg filled): its ONNX int8 export with ``sdg.filters.backend=onnx-int8``, else torch."""
    from embedtune.models import encode_queries, load_model, resolve

    cfg = recipe.prep
    if recipe.sdg.filters.backend == "onnx-int8":
        if cfg.query_max_length or cfg.passage_max_length:
            log.info("prep: query/passage_max_length set, which the ONNX export cannot change: mining with torch")
        else:
            from embedtune.convert.cached import cached_int8_encoder
            from embedtune.retrieval.cache import encode_cached

            if (onnx := cached_int8_encoder(recipe.model)) is not None:
                return (onnx.encode(queries, "query"),
                        encode_cached(onnx, chunks, "passage", cache, what="base model (onnx int8), chunks"))
    model = load_model(recipe.model)
    q_emb = _encode(encode_queries, model, queries, cfg.mining_batch_size, cfg.query_max_length, "encoding queries")
    with _max_length(model, cfg.passage_max_length):
        all_emb = encode_passages_cached(model, resolve(recipe.model).path, chunks, cache, what="base model, chunks")
    return q_emb, all_emb


def candidate_masks(queries: Sequence[SyntheticQuery], pool: Sequence[Chunk],
                    exclude_same_document: bool) -> tuple[list[list[int]], list[list[int]]]:
    """Per query: pool indices of its positives, and of the other chunks it must never get as negatives.

    A chunk whose text equals a positive's is excluded always (a duplicate passage is the same answer);
    with ``exclude_same_document`` so is every chunk of a positive's document.
    """
    index = {c.id: i for i, c in enumerate(pool)}
    by_doc: dict[str, list[int]] = defaultdict(list)
    by_text: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(pool):
        by_doc[c.doc_id].append(i)
        by_text[c.text].append(i)
    positives, excluded = [], []
    for q in queries:
        try:
            pos = [index[pid] for pid in q.positive_ids]
        except KeyError as exc:  # a training positive outside the pool means the split is broken
            raise ArtifactError(f"query {q.id!r}: positive {exc} is not a training candidate") from None
        banned = {j for i in pos for j in by_text[pool[i].text]}
        if exclude_same_document:
            banned |= {j for i in pos for j in by_doc[pool[i].doc_id]}
        positives.append(pos)
        excluded.append(sorted(banned - set(pos)))
    return positives, excluded


def fill_missing(mined: Mined, positives: list[list[int]], excluded: list[list[int]], q_emb: np.ndarray,
                 p_emb: np.ndarray, cfg: PrepConfig, rescore: Rescore | None = None) -> dict[str, int]:
    """Top up or drop queries with fewer than ``negatives_used`` negatives (a dropped row becomes None).

    A random negative's recorded score is the judge's (``rescore``), like the mined ones'.
    """
    rng = random.Random(cfg.seed)
    counts = {"random_negatives": 0, "dropped_short": 0, "still_short": 0}
    for i, negs in enumerate(mined.neg_idx):
        need = cfg.negatives_used - len(negs)
        if need <= 0:
            continue
        if cfg.fill_missing == "drop":
            mined.neg_idx[i] = None  # type: ignore[call-overload]
            counts["dropped_short"] += 1
            continue
        extra = random_fill(negs, set(positives[i]) | set(excluded[i]), len(p_emb), need, rng)
        negs.extend(extra)
        mined.neg_scores[i].extend(_scores(i, extra, q_emb, p_emb, rescore))
        counts["random_negatives"] += len(extra)
        counts["still_short"] += len(extra) < need
    return counts


def _scores(i: int, cols: list[int], q_emb: np.ndarray, p_emb: np.ndarray,
            rescore: Rescore | None) -> list[float]:
    """Query ``i``'s scores for candidates ``cols``: dense, or the judge's over the whole row."""
    if rescore is None:
        return [float(q_emb[i] @ p_emb[j]) for j in cols]
    import torch

    row = rescore(i, i + 1, torch.from_numpy(q_emb[i:i + 1] @ p_emb.T))[0]
    return [float(row[j]) for j in cols]


def _example(q: SyntheticQuery, pool: list[Chunk], pos_idx: list[int], mined: Mined, i: int) -> TrainExample:
    pos = [pool[j] for j in pos_idx]
    neg = [pool[j] for j in mined.neg_idx[i]]
    return TrainExample(query=q.text, pos_doc=[c.passage for c in pos], neg_doc=[c.passage for c in neg],
                        query_id=q.id, pos_ids=[c.id for c in pos], neg_ids=[c.id for c in neg],
                        pos_scores=_round(mined.pos_scores[i]), neg_scores=_round(mined.neg_scores[i]))


def _round(values: list[float]) -> list[float]:
    return [round(float(v), 6) for v in values]


@contextlib.contextmanager
def _max_length(model, max_length: int | None) -> Iterator[None]:
    """Cap the model's max_seq_length for one pass (the embedding cache keys on it)."""
    old = model.max_seq_length
    if max_length:
        model.max_seq_length = min(max_length, old or max_length)
    try:
        yield
    finally:
        model.max_seq_length = old


def _encode(fn: Callable[..., np.ndarray], model, texts: list[str], batch_size: int, max_length: int | None,
            description: str) -> np.ndarray:
    """Encode in slices under a progress bar; ``max_length`` caps the model's length for this pass only."""
    with _max_length(model, max_length):
        step = batch_size * 4  # progress in texts, a few batches at a time
        parts = [fn(model, texts[s:s + step], batch_size=batch_size)
                 for s in track(range(0, len(texts), step), description, total=len(texts), unit="texts",
                                weight=lambda s: min(step, len(texts) - s))]
    dim = model.get_embedding_dimension() or 0
    return np.concatenate(parts) if parts else np.zeros((0, dim), dtype=np.float32)
