"""What a person reads: results.json -> Markdown tables, a PNG, and a rich table for the terminal.

``results`` is the dict written to ``eval/results.json``: ``models`` lists the model keys in display
order (the first is the baseline every other model is compared with); each key maps to that model's
metrics; ``bm25`` is the lexical reference; ``hybrid`` maps ``bm25_weight`` and each model key to the
metrics of that model fused with BM25 (shown as columns ``hybrid:<model>``); ``matryoshka`` maps ``dims``
and each model key to ``{dim: metrics}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from embedtune.artifacts import atomic_open, write_text
from embedtune.retrieval import release
from embedtune.retrieval.metrics import HEADLINE

NAMES = {"ndcg": "nDCG", "recall": "Recall", "precision": "Precision", "map": "MAP", "mrr": "MRR"}


def metric_names(results: dict[str, Any]) -> list[str]:
    ks = results.get("k_values") or [1, 5, 10, 100]
    return [f"{m}@{k}" for m in ("ndcg", "recall", "precision", "map") for k in ks] + ["mrr@10"]


def pretty(metric: str) -> str:
    name, _, k = metric.partition("@")
    return f"{NAMES.get(name, name)}@{k}"


HYBRID = "hybrid:"  # column-key prefix of a model fused with BM25


def _columns(results: dict[str, Any]) -> list[str]:
    hybrid = results.get("hybrid") or {}
    return ((["bm25"] if results.get("bm25") else []) + list(results["models"])
            + [HYBRID + m for m in results["models"] if m in hybrid])


def _scores(results: dict[str, Any], column: str) -> dict[str, float]:
    if column.startswith(HYBRID):
        return results["hybrid"][column.removeprefix(HYBRID)]
    return results[column]


def _change(base: float, new: float) -> tuple[str, str]:
    rel = f"{(new - base) / base * 100:+.1f}%" if base else "n/a"
    return f"{new - base:+.4f}", rel


def _header(results: dict[str, Any]) -> str:
    q = f", queries from `{results['queries_from']}`" if results.get("queries_from") else ""
    return (f"**Dataset** `{results['dataset']}` (split `{results.get('split', 'test')}`{q}): "
            f"{results['n_queries']} queries, {results['n_docs']} documents.")


def markdown_report(results: dict[str, Any]) -> str:
    models, cols = list(results["models"]), _columns(results)
    base = models[0]
    lines = ["# Retrieval evaluation", "", _header(results), ""]
    if excluded := results.get("excluded_examples"):
        lines += [f"{len(excluded)} queries were left out: they were shown to the query writer as examples "
                  f"(`sdg.examples`): {', '.join(map(str, excluded[:20]))}.", ""]
    if results.get("warnings"):
        lines += [f"{len(results['warnings'])} qrels rows were skipped (see `warnings` in results.json).", ""]
    head = ["metric", *(_label(results, c) for c in cols)]
    for other in models[1:]:
        head += [f"Δ {_label(results, other)} (abs)", "Δ (rel)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for metric in metric_names(results):
        row = [pretty(metric)] + [_fmt(_scores(results, c).get(metric)) for c in cols]
        for other in models[1:]:
            row += list(_change(results[base][metric], results[other][metric]))
        lines.append("| " + " | ".join(row) + " |")
    lines += _paired_md(results)
    lines += _matryoshka_md(results)
    lines += _timing_md(results)
    if results.get("endpoint"):
        lines += endpoint_markdown(results["endpoint"])
    return "\n".join(lines) + "\n"


def _retrieval_key(column: str) -> str:
    """A report column (``hybrid:base``) as the retrieval key of ``per_query`` (``base_hybrid``)."""
    return f"{column.removeprefix(HYBRID)}_hybrid" if column.startswith(HYBRID) else column


def _label(results: dict[str, Any], key: str) -> str:
    if key == "bm25":
        return "BM25"
    if key.startswith(HYBRID):
        return f"{_label(results, key.removeprefix(HYBRID))} + BM25"
    return {"base": "base", "finetuned": "fine-tuned"}.get(key, results[key].get("label", key))


def _fmt(v: float | None) -> str:
    return "–" if v is None else f"{v:.4f}"


def _paired_md(results: dict[str, Any]) -> list[str]:
    """Each retrieval's nDCG@10 against the base model, with its paired interval, and the release gate's
    verdict (the function the deploy stage acts on)."""
    paired = (results.get("paired") or {}).get("retrievals") or {}
    lines = []
    if paired:
        conf = next(iter(paired.values())).get("confidence", 0.95)
        lines += ["", f"## Against the base model (dense), paired over the same {results['n_queries']} queries",
                  "", f"| retrieval | nDCG@10 | Δ vs base | {round(conf * 100)} % paired interval | p "
                  "| beyond the noise |",
                  "|---|---|---|---|---|---|"]
        per = release.scores(results)
        for key, d in paired.items():
            label = release.Retrieval.parse(key).label
            beyond = "better" if d["low"] > 0 else "worse" if d["high"] < 0 else "no"
            lines.append(f"| {label} | {release.mean(per[key]):.4f} | {d['mean']:+.4f} | "
                         f"[{d['low']:+.4f}, {d['high']:+.4f}] | {d['p_value']:.3g} | {beyond} |")
        if hybrid := results.get("hybrid"):
            lines += ["", f"Fused with BM25: z-score fusion, BM25 weight {hybrid['bm25_weight']} (the weight the "
                      "index deploys; chosen on the synthetic held-out queries when the run has them)."]
    if release_ := results.get("release"):
        lines += ["", f"**Release gate** (on {release_['queries']} {results.get('decided_on', 'queries')}): "
                  f"{release_['line']}."]
    if synthetic := results.get("synthetic"):
        per = release.scores(synthetic)
        cells = ", ".join(f"{release.Retrieval.parse(k).label} {release.mean(v):.4f}" for k, v in per.items()
                          if "@" not in k)
        lines += ["", f"Synthetic held-out queries ({synthetic['n_queries']}, {synthetic['n_docs']} chunks), "
                  f"nDCG@10: {cells}. They show what the fine-tune learned of its own queries; the gate reads "
                  "the real ones."]
    return lines


def _matryoshka_md(results: dict[str, Any]) -> list[str]:
    mat = results.get("matryoshka") or {}
    dims = mat.get("dims") or []
    keys = [m for m in results["models"] if m in mat]
    if len(dims) < 2 or not keys:
        return []
    head = ["dimensions"] + [f"{_label(results, m)} nDCG@10" for m in keys]
    head += [f"{_label(results, m)} Recall@10" for m in keys]
    lines = ["", "## Matryoshka: truncated and re-normalised embeddings", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for d in dims:
        row = [str(d)] + [_fmt(mat[m].get(str(d), {}).get("ndcg@10")) for m in keys]
        row += [_fmt(mat[m].get(str(d), {}).get("recall@10")) for m in keys]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _timing_md(results: dict[str, Any]) -> list[str]:
    rows = []
    for m in results["models"]:
        r = results[m]
        rate = f"{r['docs_per_second']:.1f} docs/s" if r.get("docs_per_second") else "from cache"
        rows.append(f"| {_label(results, m)} | {r.get('dim', '')} | {r.get('encode_seconds', 0):.1f} | {rate} |")
    return ["", "## Encoding", "", "| model | dim | seconds | speed |", "|---|---|---|---|", *rows]


def endpoint_markdown(ep: dict[str, Any]) -> list[str]:
    lines = ["", f"## Served model `{ep['model']}` at {ep['base_url']}", "",
             f"Compared with **{ep['reference']}**, tolerance {ep['tolerance_low_k']} at k < 5 and "
             f"{ep['tolerance_high_k']} at k ≥ 5: "
             + ("**within tolerance**." if not ep["violations"] else f"**{len(ep['violations'])} drift(s)**:")]
    lines += [f"- {v['metric']}: {v['actual']:.4f} vs {v['expected']:.4f} ({v['diff']:+.4f})"
              for v in ep["violations"]]
    return lines


def rich_table(results: dict[str, Any], metrics: list[str] | None = None) -> Table:
    models, cols = list(results["models"]), _columns(results)
    table = Table(title=f"{results['dataset']} · {results['n_queries']} queries · {results['n_docs']} docs")
    table.add_column("metric")
    for c in cols:
        table.add_column(_label(results, c), justify="right")
    for other in models[1:]:
        table.add_column(f"Δ {_label(results, other)}", justify="right")
    for metric in metrics or metric_names(results):
        row = [pretty(metric)] + [_fmt(_scores(results, c).get(metric)) for c in cols]
        for other in models[1:]:
            a, b = results[models[0]][metric], results[other][metric]
            colour = "green" if b > a else "red" if b < a else "dim"
            row.append(f"[{colour}]{b - a:+.4f} ({_change(a, b)[1]})[/]")
        table.add_row(*row)
    return table


def plot_report(results: dict[str, Any], path: str | Path) -> Path:
    """Bars (nDCG@10, Recall@10, MAP@10 per model and BM25) and nDCG@10 over Matryoshka dimensions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = _columns(results)
    mat = results.get("matryoshka") or {}
    dims = mat.get("dims") or []
    curve = len(dims) > 1
    fig, axes = plt.subplots(1, 2 if curve else 1, figsize=(12 if curve else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(cols)
    paired = (results.get("paired") or {}).get("retrievals") or {}
    for i, c in enumerate(cols):
        values = [_scores(results, c).get(m, 0.0) for m in HEADLINE]
        # nDCG@10's error bar: the paired 95 % interval of the difference to the base model, drawn around
        # the bar (a bar whose interval clears the base model's value is beyond the noise).
        d = paired.get(_retrieval_key(c))
        err = [[0.0] * len(HEADLINE), [0.0] * len(HEADLINE)]
        if d is not None:
            err = [[d["mean"] - d["low"]] + [0.0] * (len(HEADLINE) - 1),
                   [d["high"] - d["mean"]] + [0.0] * (len(HEADLINE) - 1)]
        bars = ax.bar([x + i * width for x in range(len(HEADLINE))], values, width, label=_label(results, c),
                      yerr=err if d is not None else None, capsize=3, error_kw={"elinewidth": 1})
        ax.bar_label(bars, fmt="%.3f", fontsize=7)
    ax.set_xticks([x + width * (len(cols) - 1) / 2 for x in range(len(HEADLINE))], [pretty(m) for m in HEADLINE])
    ax.set_ylim(0, 1.18)  # head room for the legend above the bars
    title = f"{results['dataset']}: {results['n_queries']} queries, {results['n_docs']} docs"
    if release_ := results.get("release"):
        title += f"\nrelease gate: deploy {release_['label']}" + (" (beyond the noise)" if release_["deployed"]
                                                                   == release_["challenger"] else "")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="upper center", ncol=len(cols), fontsize=8, frameon=False)
    if curve:
        ax2 = axes[0][1]
        for m in results["models"]:
            if m in mat:
                xs = [d for d in dims if str(d) in mat[m]]
                ax2.plot(xs, [mat[m][str(d)]["ndcg@10"] for d in xs], marker="o", label=_label(results, m))
        if results.get("bm25"):
            ax2.axhline(results["bm25"]["ndcg@10"], ls="--", color="grey", label="BM25")
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(dims, [str(d) for d in dims])
        ax2.set_xlabel("embedding dimensions (truncated, re-normalised)")
        ax2.set_ylabel("nDCG@10")
        ax2.set_title("Matryoshka sweep")
        ax2.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(path, "wb", encoding=None) as fh:
        fig.savefig(fh, format="png", dpi=110)
    plt.close(fig)
    return Path(path)


def write_reports(results: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """``results.json``, ``report.md`` and ``report.png`` in ``out_dir``."""
    from embedtune.artifacts import write_json

    out = Path(out_dir)
    return [write_json(out / "results.json", results), write_text(out / "report.md", markdown_report(results)),
            plot_report(results, out / "report.png")]
