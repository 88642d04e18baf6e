"""The run summary: peak memory per stage, one row per retrieval (dense, BM25, fused, Matryoshka) and a
verdict that names what to deploy only when it beats the base model by more than the noise."""

from __future__ import annotations

import json

from rich.console import Console

from embedtune.artifacts import Manifest
from embedtune.cli.pipeline import _quality_table, _summary, noise, retrieval_rows, verdict
from embedtune.pipeline import StageResult

METRICS = {"base_ndcg@10": 0.60, "finetuned_ndcg@10": 0.65, "bm25_ndcg@10": 0.62,
           "base_recall@10": 0.70, "finetuned_recall@10": 0.68, "bm25_recall@10": 0.69,
           "base_map@10": 0.5, "finetuned_map@10": 0.55, "bm25_map@10": 0.52,
           "base_hybrid_ndcg@10": 0.70, "finetuned_hybrid_ndcg@10": 0.74}
RESULTS = {"matryoshka": {"dims": [384, 128, 64],
                          "base": {"384": {"ndcg@10": 0.60}, "128": {"ndcg@10": 0.50}},
                          "finetuned": {"384": {"ndcg@10": 0.65}, "128": {"ndcg@10": 0.645, "recall@10": 0.67},
                                        "64": {"ndcg@10": 0.58}}}}


def _text(renderable, width=160) -> str:
    out = Console(record=True, width=width)
    out.print(renderable)
    return out.export_text()


def test_rows_cover_dense_bm25_fused_and_matryoshka_with_the_change_against_base():
    rows = retrieval_rows(METRICS, RESULTS)
    assert [r.label for r in rows] == ["base (dense)", "fine-tuned (dense)", "BM25", "base + BM25",
                                       "fine-tuned + BM25", "fine-tuned @ 128 dims", "fine-tuned @ 64 dims"]
    lines = _text(_quality_table(rows, 400)).splitlines()
    ft = next(line for line in lines if "fine-tuned (dense)" in line)
    assert [c for c in ft.split() if c[0] in "+-0123456789"] == ["0.6500", "0.6800", "0.5500", "+0.0500"]
    assert "+0.1400" in next(line for line in lines if "fine-tuned + BM25" in line)
    assert "-0.0200" in next(line for line in lines if "@ 64 dims" in line)


def test_verdict_deploys_the_best_only_beyond_the_noise():
    rows = retrieval_rows(METRICS, RESULTS)
    many = verdict(rows, 400)  # noise at n=400: about ±0.046
    assert "deploy [bold]fine-tuned + BM25[/]" in many and "+0.1400" in many
    assert "128 dims cost -0.0050" in many  # within half the noise of the full-width fine-tuned model
    few = verdict(rows, 15)  # ±0.34 on 15 queries: nothing is a real gain
    assert "deploy [bold]base (dense)[/]" in few and "noise ±0.3" in few and "dims" not in few
    assert noise(0.6, 15) > noise(0.6, 400) > 0


def test_summary_prints_peak_memory_per_stage_and_the_verdict(tmp_path, capsys):
    from embedtune import console as con

    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps(RESULTS))
    results = [StageResult("sdg", Manifest(stage="sdg", counts={"kept": 40}, peak_rss_mb=812.4), 12.0),
               StageResult("eval", Manifest(stage="eval", counts={"queries": 400}, metrics=METRICS,
                                            peak_rss_mb=1500.0), 3.0)]
    recorder = Console(record=True, width=200)
    old = con.console
    import embedtune.cli.pipeline as cli_pipeline

    con_module_console = cli_pipeline.console
    cli_pipeline.console = recorder
    try:
        _summary(results, tmp_path)
    finally:
        cli_pipeline.console = con_module_console
    assert old is con.console
    text = recorder.export_text()
    sdg = next(line for line in text.splitlines() if line.strip().startswith("│ sdg") or " sdg " in line)
    assert "812" in sdg and "kept=40" in sdg
    assert "1500" in next(line for line in text.splitlines() if "total" in line)
    assert "fine-tuned @ 128 dims" in text and "verdict: deploy fine-tuned + BM25" in text
