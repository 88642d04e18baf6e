"""The run summary: peak memory per stage, one row per retrieval (dense, BM25, fused, Matryoshka) with its
paired interval against the base model, and the deploy stage's one-line decision (the release gate's)."""

from __future__ import annotations

import json

from rich.console import Console

from embedtune.artifacts import Manifest
from embedtune.cli.pipeline import _summary, quality_table
from embedtune.pipeline import StageResult
from embedtune.retrieval.release import decide, paired_vs

N = 40
PER = {"base": [0.60] * N, "finetuned": [0.65] * N, "bm25": [0.62] * N,
       "base_hybrid": [0.70] * N, "finetuned_hybrid": [0.74 - 0.02 * (i % 2) for i in range(N)],
       "finetuned@128": [0.645] * N, "finetuned@64": [0.58] * N}
RESULTS = {"dataset": "toy", "n_queries": N, "n_docs": 100, "decided_on": "your real queries",
           "base": {"ndcg@10": 0.60, "recall@10": 0.70, "map@10": 0.5, "dim": 384},
           "finetuned": {"ndcg@10": 0.65, "recall@10": 0.68, "map@10": 0.55, "dim": 384},
           "bm25": {"ndcg@10": 0.62, "recall@10": 0.69, "map@10": 0.52},
           "hybrid": {"bm25_weight": 0.3, "base": {"ndcg@10": 0.70}, "finetuned": {"ndcg@10": 0.73}},
           "matryoshka": {"dims": [384, 128, 64], "finetuned": {"384": {"ndcg@10": 0.65},
                                                               "128": {"ndcg@10": 0.645}, "64": {"ndcg@10": 0.58}}},
           "per_query": {"query_ids": [f"q{i}" for i in range(N)], "ndcg@10": PER}}
RESULTS["paired"] = {"reference": "base", "retrievals": paired_vs(RESULTS)}
RESULTS["release"] = decide(RESULTS).to_json()


def _text(renderable, width=200) -> str:
    out = Console(record=True, width=width)
    out.print(renderable)
    return out.export_text()


def test_rows_cover_dense_bm25_fused_and_matryoshka_with_paired_intervals():
    lines = _text(quality_table(RESULTS)).splitlines()
    labels = ["base (dense)", "fine-tuned (dense)", "BM25", "base + BM25", "fine-tuned + BM25",
              "fine-tuned @ 128 dims", "fine-tuned @ 64 dims"]
    assert [next(i for i, line in enumerate(lines) if f"│ {label} " in line) for label in labels] == sorted(
        next(i for i, line in enumerate(lines) if f"│ {label} " in line) for label in labels)
    ft = next(line for line in lines if "fine-tuned (dense)" in line)
    assert "0.6500" in ft and "+0.0500 [+0.0500, +0.0500] better" in ft
    assert "worse" in next(line for line in lines if "@ 64 dims" in line)
    assert "40 your real queries" in "\n".join(lines)


def test_summary_prints_peak_memory_per_stage_and_the_deployed_line(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(RESULTS))
    (tmp_path / "deploy").mkdir()
    served = "fine-tuned + BM25 (export (int8), 384 dims, hybrid search, BM25 weight 0.3) — beats base + BM25"
    (tmp_path / "deploy" / "decision.json").write_text(json.dumps({"served": served}))
    results = [StageResult("sdg", Manifest(stage="sdg", counts={"kept": 40}, peak_rss_mb=812.4), 12.0),
               StageResult("eval", Manifest(stage="eval", counts={"queries": N}, peak_rss_mb=1500.0), 3.0),
               StageResult("deploy", Manifest(stage="deploy", counts={"chunks": 100}), 2.0)]
    text = _recorded(results, tmp_path)
    sdg = next(line for line in text.splitlines() if " sdg " in line)
    assert "812" in sdg and "kept=40" in sdg
    assert "1500" in next(line for line in text.splitlines() if "total" in line)
    assert "fine-tuned @ 128 dims" in text and f"deployed: {served}" in text


def test_summary_without_deploy_prints_the_gates_recommendation(tmp_path):
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(RESULTS))
    text = _recorded([StageResult("eval", Manifest(stage="eval", counts={"queries": N}), 3.0)], tmp_path)
    flat = " ".join(text.split())
    assert f"release gate: {RESULTS['release']['line']}" in flat and "deployed:" not in flat


def _recorded(results, root) -> str:
    import embedtune.cli.pipeline as cli_pipeline

    recorder = Console(record=True, width=250)
    saved = cli_pipeline.console
    cli_pipeline.console = recorder
    try:
        _summary(results, root)
    finally:
        cli_pipeline.console = saved
    return recorder.export_text()
