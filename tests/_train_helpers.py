"""Shared helpers for the finetune tests: a run directory with a finished prep stage."""

from __future__ import annotations

import random
from pathlib import Path

from embedtune.artifacts import RunDir, write_jsonl
from embedtune.config import Recipe, validate_recipe

TOPICS = [
    "stars planets galaxies telescopes orbit comets nebula gravity",
    "recipes ovens flour butter baking sauces knives spices",
    "stocks bonds interest rates inflation markets dividends banks",
    "patients doctors vaccines diagnosis symptoms therapy hospitals",
    "boats wind sails harbour knots tides rudder mast",
    "processors memory compilers software kernels threads caches",
]


def synthetic_examples(n: int, negatives: int = 4, seed: int = 0) -> list[dict]:
    """``n`` TrainExample rows: a query of words from its passage, hard negatives (distinct per row) from
    other topics, so that the no-duplicates batch sampler can fill whole batches as with real mined data."""
    rng = random.Random(seed)

    def passage(topic: int, tag: str) -> str:
        vocab = TOPICS[topic % len(TOPICS)].split()
        return f"{tag}: " + " ".join(rng.choice(vocab) for _ in range(12))

    rows = []
    for i in range(n):
        pos = passage(i, f"doc {i}")
        negs = [passage(i + 1 + j, f"other {i}.{j}") for j in range(negatives)]
        rows.append(
            {
                "query": f"{pos.split()[2]} doc {i}?",
                "pos_doc": [pos],
                "neg_doc": negs,
                "query_id": f"q{i}",
                "pos_ids": [f"p{i}"],
                "neg_ids": [f"n{i}.{j}" for j in range(negatives)],
            }
        )
    return rows


def make_run(root: Path, rows: list[dict]) -> RunDir:
    run = RunDir(root)
    st = run.stage("prep", {"test": True})
    st.up_to_date(force=True)
    out = run.path("prep", "train.jsonl")
    write_jsonl(out, rows)
    st.finish(outputs=[out])
    return run


def tiny_recipe(model_dir: Path, model: dict | None = None, **finetune) -> Recipe:
    """A recipe for a few fast steps on a tiny model (no Matryoshka unless asked, small validation corpus)."""
    ft = {
        "epochs": 1,
        "learning_rate": 1e-3,
        "warmup_steps": 0,
        "checkpoint_steps": 50,
        "matryoshka_dims": None,
        "val_corpus_size": 20,
        **finetune,
    }
    return validate_recipe({"model": {"name": str(model_dir), **(model or {})}, "finetune": ft})
