"""Times the demo pipeline (`make demo`: build the demo corpus, `embedtune run -c recipes/demo.yaml`) stage by
stage, with each stage's peak resident memory, in a fresh temporary run directory.

    PYTHONPATH=src python bench/demo_time.py [--recipe recipes/demo.yaml] [-o sdg.max_chunks=120]

Goals (issue 23): at most 300 s and 4 GB on 2 idle cores. The machine's load average is printed beside the
figures: on shared cores the seconds are not the idle figure.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from embedtune.config import load_recipe  # noqa: E402
from embedtune.console import setup_logging  # noqa: E402
from embedtune.cpu import isa_summary  # noqa: E402
from embedtune.demo import build  # noqa: E402
from embedtune.pipeline import run_pipeline  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GOAL_SECONDS, GOAL_MB = 300, 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "demo.yaml")
    ap.add_argument("-o", "--override", action="append", default=[], help="recipe override KEY=VALUE")
    ap.add_argument("--to", default=None, help="last stage (default: all)")
    ap.add_argument("--out", type=Path, default=None, help="keep the run here (default: a temporary folder)")
    args = ap.parse_args()
    setup_logging()
    out = args.out or Path(tempfile.mkdtemp(prefix="demo-bench-"))
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    build(out / "demo_corpus")
    corpus_s = time.perf_counter() - t0
    recipe = load_recipe(args.recipe, [f"corpus.path={out / 'demo_corpus'}", *args.override])
    results = run_pipeline(recipe, out / "run", to=args.to)
    total = corpus_s + sum(r.seconds for r in results)
    peak = max(r.manifest.peak_rss_mb or 0 for r in results)
    load_after = os.getloadavg()
    print(f"\n## demo pipeline ({args.recipe.name}{', ' + ', '.join(args.override) if args.override else ''})\n")
    print(f"load average before {load_before[0]:.1f}, after {load_after[0]:.1f} / {load_after[1]:.1f} / "
          f"{load_after[2]:.1f} on {os.cpu_count()} cores\n\ncpu: {isa_summary()}\n")
    print("| stage | seconds | peak RSS (MB) | counts |\n|---|---|---|---|")
    print(f"| build demo corpus | {corpus_s:.1f} | | |")
    for r in results:
        counts = ", ".join(f"{k}={v}" for k, v in r.manifest.counts.items() if isinstance(v, int | float))
        print(f"| {r.name} | {r.seconds:.1f} | {r.manifest.peak_rss_mb or 0:.0f} | {counts} |")
    print(f"| **total** | **{total:.1f}** (goal {GOAL_SECONDS} on idle cores) | **{peak:.0f}** (goal {GOAL_MB}) | |")
    evaluated = out / "run" / "eval" / "results.json"
    if any(r.name == "eval" for r in results) and evaluated.is_file():
        import json

        from embedtune.retrieval.release import Retrieval, mean, scores

        results_json = json.loads(evaluated.read_text())
        paired = (results_json.get("paired") or {}).get("retrievals") or {}
        print(f"\n{results_json['n_queries']} {results_json.get('decided_on', 'queries')}\n")
        print("| retrieval | nDCG@10 | vs base [95 % paired interval] |\n|---|---|---|")
        for key, values in scores(results_json).items():
            d = paired.get(key)
            interval = f"{d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]" if d else ""
            print(f"| {Retrieval.parse(key).label} | {mean(values):.4f} | {interval} |")
        decision = out / "run" / "deploy" / "decision.json"
        line = json.loads(decision.read_text())["served"] if decision.is_file() else results_json["release"]["line"]
        print(f"\ndeployed: {line}")
    print(f"\nrun directory: {out / 'run'}")


if __name__ == "__main__":
    main()
