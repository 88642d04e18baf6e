"""What prep produced, for a person: score distributions (table, Markdown, PNG) and an audit sample."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
from rich import box
from rich.table import Table

from embedtune.artifacts import write_text
from embedtune.console import console
from embedtune.schemas import TrainExample

STATS = ("count", "min", "p5", "p25", "median", "mean", "p75", "p95", "max")


def score_stats(values: list[float]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    a = np.asarray(values, dtype=np.float64)
    p5, p25, med, p75, p95 = np.percentile(a, [5, 25, 50, 75, 95])
    return {"count": len(a), "min": float(a.min()), "p5": float(p5), "p25": float(p25), "median": float(med),
            "mean": float(a.mean()), "p75": float(p75), "p95": float(p95), "max": float(a.max())}


def score_report(examples: list[TrainExample]) -> dict[str, dict[str, float]]:
    """Distribution of positive and negative scores, and of each query's gap (weakest pos - best neg)."""
    gaps = [min(e.pos_scores) - max(e.neg_scores) for e in examples if e.pos_scores and e.neg_scores]
    return {"positives": score_stats([s for e in examples for s in e.pos_scores]),
            "negatives": score_stats([s for e in examples for s in e.neg_scores]),
            "gap": score_stats(gaps)}


def stats_table(report: dict[str, dict[str, float]], title: str = "prep: base-model scores") -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, collapse_padding=True)
    table.add_column("", no_wrap=True)
    for name in STATS:  # fixed width: ten columns must fit an 80-column terminal
        table.add_column(name, justify="right", no_wrap=True)
    for row, stats in report.items():
        table.add_row(row, *(_fmt(s, stats.get(s)) for s in STATS))
    return table


def markdown(report: dict[str, dict[str, float]], counts: dict[str, object]) -> str:
    lines = ["# prep report", "", "Base-model cosine scores of training positives and mined negatives; "
             "gap = weakest positive - best negative per query.", "",
             "| | " + " | ".join(STATS) + " |", "|---" * (len(STATS) + 1) + "|"]
    for row, stats in report.items():
        lines.append(f"| {row} | " + " | ".join(_fmt(s, stats.get(s)) for s in STATS) + " |")
    lines += ["", "| count | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in counts.items()]
    return "\n".join(lines) + "\n"


def _fmt(stat: str, value: float | None) -> str:
    if value is None:
        return "-"
    return str(int(value)) if stat == "count" else f"{value:.3f}"


def plot(examples: list[TrainExample], path: Path, label: str = "base-model cosine") -> Path | None:
    """Histogram of positive vs negative scores (PNG); None when there is nothing to plot."""
    pos = [s for e in examples for s in e.pos_scores]
    neg = [s for e in examples for s in e.neg_scores]
    if not pos:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(min(pos + neg), max(pos + neg), 40)
    ax.hist(pos, bins=bins, alpha=0.6, label=f"positives ({len(pos)})")
    ax.hist(neg, bins=bins, alpha=0.6, label=f"negatives ({len(neg)})")
    ax.set_xlabel(label)
    ax.set_ylabel("count")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_markdown(path: Path, report: dict[str, dict[str, float]], counts: dict[str, object]) -> Path:
    return write_text(path, markdown(report, counts))


def audit(examples: list[TrainExample], n: int, seed: int = 0, width: int = 160) -> None:
    """Print ``n`` random training queries with their positives and negatives, scores and short texts."""
    sample = random.Random(seed).sample(examples, min(n, len(examples)))
    for ex in sample:
        table = Table(title=f"[bold]{ex.query_id}[/]: {ex.query}", title_justify="left", show_lines=False)
        table.add_column("kind")
        table.add_column("score", justify="right")
        table.add_column("chunk")
        table.add_column("text")
        for kind, ids, texts, scores in (("pos", ex.pos_ids, ex.pos_doc, ex.pos_scores),
                                         ("neg", ex.neg_ids, ex.neg_doc, ex.neg_scores)):
            for i, (cid, text) in enumerate(zip(ids, texts, strict=True)):
                score = f"{scores[i]:.3f}" if i < len(scores) else "-"
                short = text if len(text) <= width else text[: width - 1] + "…"
                table.add_row(f"[green]{kind}[/]" if kind == "pos" else f"[red]{kind}[/]", score, cid,
                              short.replace("\n", " "))
        console.print(table)
