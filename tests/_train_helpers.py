"""Shared helpers for the finetune tests: a run directory with a finished prep stage."""

from __future__ import annotations

import random
from pathlib import Path

from embedtune.artifacts import RunDir, write_jsonl
from embedtune.config import Recipe, validate_recipe

TOPICS = ["stars planets galaxies telescopes orbit comets nebula gravity",
          "recipes ovens flour butter baking sauces knives spices",
          "stocks bonds interest rates inflation markets dividends banks",
          "patients doctors vaccines diagnosis symptoms therapy hospitals",
          "boats wind sails harbour knots tides rudder mast",
          "processors memory compilers software kernels threads caches"]


def synthetic_examples(n: int, negatives: int = 4, seed: int = 0) -> list[dict]:
    """``n`` TrainExample rows: a query of words from its passage, hard negatives from other topics."""
    rng = random.Random(seed)
    passages = []
    for i in range(max(n, negatives + 2)):
        vocab = TOPICS[i % len(TOPICS)].split()
        passages.append(f"doc {i}: " + " ".join(rng.choice(vocab) for _ in range(12)) + f" item{i}")
    rows = []
    for i in range(n):
        negs = [passages[j] for j in rng.sample([j for j in range(len(passages)) if j != i], negatives)]
        rows.append({"query": f"{passages[i].split(':')[1].split()[0]} item{i}?", "pos_doc": [passages[i]],
                     "neg_doc": negs, "query_id": f"q{i}", "pos_ids": [f"p{i}"],
                     "neg_ids": [f"p{passages.index(t)}" for t in negs]})
    return rows


def make_run(root: Path, rows: list[dict]) -> RunDir:
    run = RunDir(root)
    st = run.stage("prep", {"test": True})
    st.up_to_date(force=True)
    out = write_jsonl(run.path("prep", "train.jsonl"), rows) and run.path("prep", "train.jsonl")
    st.finish(outputs=[out])
    return run


def tiny_recipe(model_dir: Path, **finetune) -> Recipe:
    ft = {"epochs": 1, "learning_rate": 1e-3, "checkpoint_steps": 50, "matryoshka_dims": None,
          "val_corpus_size": 20, **finetune}
    return validate_recipe({"model": {"name": str(model_dir)}, "finetune": ft})
