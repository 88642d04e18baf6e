"""The Matryoshka truncation sizes a fine-tune trains (MatryoshkaLoss), from the recipe and the model's size."""

from __future__ import annotations

# Matryoshka ladder: sizes users actually truncate to (nemotron-embed offers 384..2048; MiniLM-class 64..384).
MATRYOSHKA_LADDER = (4096, 3072, 2048, 1024, 768, 512, 384, 256, 128, 64)
# Smallest truncation worth training for, relative to the full size (2048 -> 384, 384 -> 64).
MATRYOSHKA_MIN_FRACTION = 1 / 6
MATRYOSHKA_MIN_DIM = 64


def matryoshka_dims(setting: list[int] | str | None, dim: int) -> list[int] | None:
    """The truncation sizes MatryoshkaLoss trains, largest first; None means plain training.

    ``auto``: the full size plus the ladder sizes below it down to max(64, dim/6), e.g. 384 -> 384/256/128/64,
    768 -> 768/512/384/256/128, 2048 -> 2048/1024/768/512/384. Models below 128 dims (tiny test models)
    get None: there is nothing worth truncating to.
    """
    if setting is None:
        return None
    if setting == "auto":
        floor = max(MATRYOSHKA_MIN_DIM, dim * MATRYOSHKA_MIN_FRACTION)
        dims = [dim] + [d for d in MATRYOSHKA_LADDER if floor <= d < dim]
        return dims if len(dims) > 1 else None
    bad = [d for d in setting if d > dim or d < 1]
    if bad:
        raise ValueError(f"finetune.matryoshka_dims {bad} outside 1..{dim} (the model's embedding size)")
    dims = sorted(set(setting) | {dim}, reverse=True)
    return dims if len(dims) > 1 else None
