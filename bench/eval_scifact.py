"""Correctness anchor and speed of the evaluator: all-MiniLM-L6-v2 on BEIR SciFact (test split).

Published (MTEB): nDCG@10 0.64508. BEIR paper BM25: 0.665. Prints the metrics table, the encoding time
and docs/s, then re-runs from the embedding cache (second call: no encoding) and prints the ratio.

    PYTHONPATH=src python bench/eval_scifact.py [--data ../shared/data/scifact] [--model default]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

PUBLISHED_NDCG10 = 0.64508
# ../shared/data/scifact from the repository, or from a worktree one level deeper.
DEFAULT_DATA = next((p / "shared" / "data" / "scifact" for p in Path(__file__).resolve().parents
                     if (p / "shared" / "data" / "scifact").is_dir()), Path("../shared/data/scifact"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--model", default="default")
    ap.add_argument("--split", default="test")
    ap.add_argument("--cache-dir", type=Path, default=None, help="default: a temporary folder")
    args = ap.parse_args()

    from embedtune.config import EvalConfig
    from embedtune.console import console, setup_logging
    from embedtune.evaluate import EmbeddingCache, load_beir, load_encoder
    from embedtune.evaluate.report import rich_table
    from embedtune.evaluate.stage import compare_models

    setup_logging()
    data = load_beir(args.data, args.split)
    cfg = EvalConfig(split=args.split)
    with tempfile.TemporaryDirectory() as tmp:
        cache = EmbeddingCache(args.cache_dir or tmp)
        models = {"model": lambda: load_encoder(args.model, args.model, cfg.batch_size)}
        t0 = time.perf_counter()
        results = compare_models(data, models, cfg, cache=cache, dims=[256, 128, 64])
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = compare_models(data, models, cfg, cache=cache, dims=[256, 128, 64])
        second = time.perf_counter() - t0
    r = results["model"]
    console.print(rich_table(results, ["ndcg@1", "ndcg@10", "recall@10", "recall@100", "map@10", "mrr@10"]))
    for d, m in results["matryoshka"]["model"].items():
        print(f"  dims {d:>4}: nDCG@10 {m['ndcg@10']:.4f}")
    ndcg = r["ndcg@10"]
    print(f"dataset {data.name}: {len(data.queries)} queries, {len(data.corpus)} docs")
    print(f"nDCG@10 {ndcg:.4f}  published {PUBLISHED_NDCG10:.4f}  diff {ndcg - PUBLISHED_NDCG10:+.4f}")
    print(f"BM25 nDCG@10 {results['bm25']['ndcg@10']:.4f}  (BEIR paper, Elasticsearch: 0.665)")
    print(f"first run {first:.1f}s (encoding {r['encode_seconds']:.1f}s, {r['docs_per_second']} docs/s); "
          f"cached rerun {second:.1f}s  -> {first / max(second, 1e-9):.1f}x faster")
    assert again["model"]["ndcg@10"] == ndcg, "cached embeddings gave different figures"
    ok = args.model != "default" or abs(ndcg - PUBLISHED_NDCG10) <= 0.002
    print("anchor OK" if ok else "anchor FAILED: more than 0.002 away from the published figure")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
