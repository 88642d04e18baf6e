"""Training throughput (examples/s) of the shipped default model: batch 16 vs 32, MNRL vs CachedMNRL, and
fp32 vs bf16 mixed precision on a CPU (``finetune.cpu_bf16``).

Runs the real finetune stage on synthetic rows (1 query, 1 positive, 4 hard negatives; passages of about
150 words, like real chunks) and reads examples/s from the manifest (optimizer steps only, no evaluation).
Ratios are against MNRL at batch 16 in fp32, measured in the same process. bf16 rows are added where the CPU
multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere it is emulated and slower (``--precisions fp32,bf16``
measures it anyway).

    PYTHONPATH=src python bench/train_throughput.py [--examples 64] [--model default] [--precisions fp32,bf16]
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

from embedtune.artifacts import RunDir, write_jsonl
from embedtune.config import validate_recipe
from embedtune.console import setup_logging
from embedtune.train import run_finetune
from embedtune.train.machine import cpu_has_native_bf16

WORDS = [
    "protein",
    "cell",
    "gene",
    "expression",
    "tumour",
    "patients",
    "trial",
    "dose",
    "receptor",
    "pathway",
    "signal",
    "mutation",
    "therapy",
    "binding",
    "enzyme",
    "tissue",
    "response",
    "model",
    "study",
    "analysis",
    "results",
    "increased",
    "reduced",
    "effect",
]

CONFIGS = [  # (label, global batch, loss, GradCache mini-batch)
    ("MNRL b16", 16, "mnrl", None),
    ("MNRL b32", 32, "mnrl", None),
    ("CachedMNRL b16 (mini 8)", 16, "cached_mnrl", 8),
    ("CachedMNRL b32 (mini 8)", 32, "cached_mnrl", 8),
]


def rows(n: int, negatives: int = 4, words: int = 150, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def text(tag: str) -> str:
        return tag + " " + " ".join(rng.choice(WORDS) for _ in range(words))

    return [
        {
            "query": f"what does {rng.choice(WORDS)} do in case {i}?",
            "pos_doc": [text(f"p{i}")],
            "neg_doc": [text(f"n{i}.{j}") for j in range(negatives)],
            "query_id": f"q{i}",
            "pos_ids": [f"p{i}"],
            "neg_ids": [f"n{i}.{j}" for j in range(negatives)],
        }
        for i in range(n)
    ]


def measure(model: str, data: list[dict], batch: int, loss: str, mini: int | None, bf16: bool, root: Path) -> dict:
    run = RunDir(root)
    st = run.stage("prep", {"bench": True})
    st.up_to_date(force=True)
    write_jsonl(run.path("prep", "train.jsonl"), data)
    st.finish(outputs=[run.path("prep", "train.jsonl")])
    recipe = validate_recipe(
        {
            "model": {"name": model},
            "finetune": {
                "epochs": 1,
                "global_batch_size": batch,
                "auto_scale_batch": False,
                "loss": loss,
                "micro_batch_size": mini,
                "validation_fraction": 0.0,
                "checkpoint_steps": 1000,
                "cpu_bf16": bf16,
            },
        }
    )
    manifest = run_finetune(recipe, run)
    return {
        "steps": manifest.counts["steps"],
        "eps": manifest.metrics["examples_per_second"],
        "seconds": manifest.metrics["train_seconds"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--model", default="default")
    parser.add_argument("--precisions", default=None,
                        help="comma list of fp32,bf16 (default: both where the CPU has native bf16, else fp32)")
    args = parser.parse_args()
    setup_logging()
    native = cpu_has_native_bf16()
    precisions = (args.precisions or ("fp32,bf16" if native else "fp32")).split(",")
    data = rows(args.examples)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (label, batch, loss, mini) in enumerate(CONFIGS):
            for precision in precisions:  # alternated per config, so drifting load falls on both alike
                r = measure(args.model, data, batch, loss, mini, precision == "bf16", Path(tmp) / f"{i}-{precision}")
                results.append((f"{label} {precision}", r))
    base = results[0][1]["eps"]
    print(f"\n{args.examples} examples x (1 query + 1 positive + 4 negatives), model {args.model!r}; "
          f"CPU native bf16 (AVX512-BF16/AMX): {native}\n")
    print("| config | steps | train s | examples/s | vs MNRL b16 fp32 |")
    print("|---|---:|---:|---:|---:|")
    for label, r in results:
        print(f"| {label} | {r['steps']} | {r['seconds']:.1f} | {r['eps']:.2f} | {r['eps'] / base:.2f}x |")


if __name__ == "__main__":
    main()
