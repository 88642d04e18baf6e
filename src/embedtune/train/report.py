"""What a person looks at after training: the loss curve with validation nDCG@10, and the step log."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedtune.artifacts import atomic_open, write_jsonl, write_text


def write_log(history: list[dict[str, Any]], path: Path) -> Path:
    write_jsonl(path, history)
    return path


def plot_curves(history: list[dict[str, Any]], metric: str | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    loss = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h[metric]) for h in history if metric and metric in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if loss:
        ax.plot(*zip(*loss, strict=True), color="tab:blue", label="training loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss", color="tab:blue")
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val, strict=True), "o-", color="tab:orange", label="validation nDCG@10")
        ax2.set_ylabel("validation nDCG@10", color="tab:orange")
    ax.set_title("finetune")
    fig.tight_layout()
    with atomic_open(path, "wb", encoding=None) as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return path


def write_summary(counts: dict[str, Any], metrics: dict[str, Any], path: Path) -> Path:
    """The run's figures as a Markdown table."""
    rows = [
        ("steps", counts["steps"]),
        ("epochs", counts["epochs"]),
        ("training examples", counts["train_examples"]),
        ("validation queries", counts["val_queries"]),
        (
            "global batch",
            f"{counts['global_batch_size']} ({counts['world_size']} x {counts['per_device_batch_size']})",
        ),
        ("loss", counts["loss"]),
        ("Matryoshka dims", metrics.get("matryoshka_dims") or "off"),
        ("examples/s", metrics["examples_per_second"]),
        ("training seconds", metrics["train_seconds"]),
        ("validation nDCG@10, base", metrics.get("base_val_ndcg@10")),
        ("validation nDCG@10, best", metrics.get("best_val_ndcg@10")),
        ("best step", metrics.get("best_step")),
        ("resumed from step", metrics.get("resumed_from_step") or "-"),
    ]
    lines = ["# finetune", "", "| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]
    return write_text(path, "\n".join(lines) + "\n")
