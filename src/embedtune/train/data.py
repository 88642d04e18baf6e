"""prep/train.jsonl -> a training dataset (anchor, positive, negative_1..k) and a held-out validation set.

Validation is split *by query*: a query's row goes wholly to train or to validation, so the evaluator never
scores a query the model was trained on. Its corpus is the held-out queries' positives and negatives plus a
sample of other passages, which makes nDCG@10 a ranking among plausible distractors rather than a trivial one.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from embedtune.artifacts import ArtifactError
from embedtune.retrieval.ids import passage_id
from embedtune.schemas import TrainExample, read_rows_numbered

if TYPE_CHECKING:
    from datasets import Dataset

# Fewer held-out queries than this make nDCG@10 too noisy to pick a checkpoint with.
MIN_VAL_QUERIES = 2


def load_examples(path: str | Path) -> list[TrainExample]:
    """Read and check the training file; every problem names the file and line."""
    examples = []
    for lineno, ex in read_rows_numbered(path, TrainExample):
        if not ex.query.strip():
            raise ArtifactError(f"{path}:{lineno}: query: empty query")
        if not ex.pos_doc or not any(d.strip() for d in ex.pos_doc):
            raise ArtifactError(f"{path}:{lineno}: pos_doc: a training example needs at least one positive")
        examples.append(ex)
    if not examples:
        raise ArtifactError(f"{path}: no training examples (the file is empty); rerun `embedtune prep`")
    return examples


@dataclass
class Validation:
    queries: dict[str, str] = field(default_factory=dict)
    corpus: dict[str, str] = field(default_factory=dict)
    relevant: dict[str, set[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.queries)


@dataclass
class TrainingData:
    train: list[TrainExample]
    validation: Validation
    negatives: int  # negative columns per row
    filled_negatives: int  # rows that had fewer negatives than asked and were filled with random passages


def split_by_query(examples: list[TrainExample], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of the distinct query ids (deterministic for a seed)."""
    ids = sorted({ex.query_id for ex in examples})
    n_val = math.ceil(len(ids) * fraction) if fraction > 0 else 0
    if n_val < MIN_VAL_QUERIES or len(ids) - n_val < 1:
        return examples, []
    held = set(random.Random(seed).sample(ids, n_val))
    return [ex for ex in examples if ex.query_id not in held], [ex for ex in examples if ex.query_id in held]


def build_validation(val: list[TrainExample], train: list[TrainExample], extra: int, seed: int) -> Validation:
    v = Validation()
    for ex in val:
        v.queries[ex.query_id] = ex.query
        pos_ids = _ids(ex.pos_ids, ex.pos_doc)
        v.relevant.setdefault(ex.query_id, set()).update(pos_ids)
        v.corpus.update(zip(pos_ids, ex.pos_doc, strict=True))
        v.corpus.update(zip(_ids(ex.neg_ids, ex.neg_doc), ex.neg_doc, strict=True))
    others = {i: t for ex in train for i, t in zip(_ids(ex.pos_ids, ex.pos_doc), ex.pos_doc, strict=True)}
    others = {i: t for i, t in others.items() if i not in v.corpus}
    picked = random.Random(seed).sample(sorted(others), min(extra, len(others)))
    v.corpus.update((i, others[i]) for i in picked)
    return v


def prepare(
    examples: list[TrainExample], negatives: int, val_fraction: float, val_corpus: int, seed: int
) -> TrainingData:
    train, val = split_by_query(examples, val_fraction, seed)
    filled = sum(1 for ex in train if len(ex.neg_doc) < negatives)
    return TrainingData(train, build_validation(val, train, val_corpus, seed), negatives, filled)


def to_dataset(examples: list[TrainExample], negatives: int, seed: int, scores: bool = False) -> Dataset:
    """Rows -> ``anchor, positive, negative_1..k`` (first positive; short negative lists filled at random).

    The fill draws from other examples' passages, never the row's own positives: the same thing NVIDIA's
    prep does for queries that mined fewer negatives than asked. With ``scores`` (MarginMSE) a ``label``
    column holds prep's teacher scores ``[positive, negative_1..k]``; rows without a score for each of their
    k negatives cannot be labelled and are left out (:func:`scored_examples`).
    """
    from datasets import Dataset

    if scores:
        examples = scored_examples(examples, negatives)
    rng = random.Random(seed)
    pool = sorted({d for ex in examples for d in (*ex.pos_doc, *ex.neg_doc)})
    columns: dict[str, list] = {"anchor": [], "positive": []}
    for i in range(1, negatives + 1):
        columns[f"negative_{i}"] = []
    for ex in examples:
        columns["anchor"].append(ex.query)
        columns["positive"].append(ex.pos_doc[0])
        for i, neg in enumerate(_negatives(ex, negatives, pool, rng), 1):
            columns[f"negative_{i}"].append(neg)
    if scores:
        columns["label"] = [[ex.pos_scores[0], *ex.neg_scores[:negatives]] for ex in examples]
    return Dataset.from_dict(columns)


def scored_examples(examples: list[TrainExample], negatives: int) -> list[TrainExample]:
    """The rows MarginMSE can use: a teacher score for the first positive and each of ``negatives``."""
    kept = [ex for ex in examples if ex.pos_scores and len(ex.neg_scores) >= negatives
            and len(ex.neg_doc) >= negatives]
    if not kept:
        raise ArtifactError(f"finetune.loss=margin_mse needs prep's scores for 1 positive and {negatives} "
                            "negatives per row, and no row has them; rerun `embedtune prep` or lower "
                            "finetune.passages_per_query")
    return kept


def _negatives(ex: TrainExample, k: int, pool: list[str], rng: random.Random) -> list[str]:
    negs = list(ex.neg_doc[:k])
    own = set(ex.pos_doc) | set(negs)
    candidates = [d for d in pool if d not in own]
    while len(negs) < k and candidates:
        negs.append(candidates.pop(rng.randrange(len(candidates))))
    while len(negs) < k:  # tiny data: not enough distinct passages; repeat rather than fail
        negs.append(negs[-1] if negs else pool[rng.randrange(len(pool))])
    return negs


def _ids(ids: list[str], texts: list[str]) -> list[str]:
    return ids if len(ids) == len(texts) else [passage_id(t) for t in texts]
