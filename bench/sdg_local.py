"""Benchmark of the `local` sdg generator (shipped SmolLM2-135M) on SciFact abstracts.

Builds a corpus of ``--corpus-docs`` SciFact abstracts, generates queries for ``--chunks`` of its chunks,
and prints a Markdown table: chunks/s, kept queries/s, usable queries per chunk, the rejection breakdown,
and the round-trip rank distribution. Baseline, measured in the same run on the first ``--baseline-chunks``
chunks: plain ``generate(num_return_sequences=n)``, which recomputes the prompt for every sample, against
the generator's shared prompt cache.

    PYTHONPATH=src python bench/sdg_local.py --chunks 50 --corpus-docs 300
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from embedtune.artifacts import RunDir, read_jsonl, write_jsonl  # noqa: E402
from embedtune.config import load_recipe  # noqa: E402
from embedtune.corpus import load_chunks, run_corpus  # noqa: E402
from embedtune.sdg import run_sdg  # noqa: E402
from embedtune.sdg.cache import ResponseCache  # noqa: E402
from embedtune.sdg.local import LocalGenerator  # noqa: E402

# ``shared/data`` beside the checkout (or beside the folder of worktrees).
SCIFACT = Path("shared", "data", "scifact", "corpus.jsonl")
DEFAULT_DATA = next((p / SCIFACT for p in Path(__file__).resolve().parents if (p / SCIFACT).is_file()),
                    Path("..") / SCIFACT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--chunks", type=int, default=50, help="chunks to generate queries for")
    ap.add_argument("--corpus-docs", type=int, default=300, help="abstracts in the corpus (round-trip pool)")
    ap.add_argument("--samples-per-chunk", type=int, default=4)
    ap.add_argument("--queries-per-chunk", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--baseline-chunks", type=int, default=8, help="0 skips the baseline")
    ap.add_argument("--threads", type=int, default=None, help="torch threads while generating")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="run directory (default: a temporary one)")
    args = ap.parse_args()

    out = args.out or Path(tempfile.mkdtemp(prefix="sdg-bench-"))
    docs = [json.loads(line) for line in args.data.open(encoding="utf-8")]
    random.Random(args.seed).shuffle(docs)
    corpus_file = out / "corpus_sample.jsonl"
    write_jsonl(corpus_file, docs[: args.corpus_docs])
    recipe = load_recipe(None, [
        f"corpus.path={corpus_file}", f"sdg.max_chunks={args.chunks}", f"sdg.seed={args.seed}",
        f"sdg.queries_per_chunk={args.queries_per_chunk}",
        f"sdg.local.samples_per_chunk={args.samples_per_chunk}",
        f"sdg.local.batch_size={args.batch_size}",
        *([f"sdg.local.threads={args.threads}"] if args.threads else []),
    ])
    run = RunDir(out / "run")
    run_corpus(recipe, run)
    manifest = run_sdg(recipe, run, force=True)
    rows = list(read_jsonl(run.path("sdg", "queries.jsonl")))
    baseline = measure_baseline(recipe, run, args.baseline_chunks) if args.baseline_chunks else None
    print(report(args, manifest, rows, baseline, os.getloadavg()[0]))
    print(f"\nrun directory: {run.root}")


def measure_baseline(recipe, run: RunDir, n: int) -> dict[str, float]:
    """Seconds per chunk for the same sampling with and without the shared prompt cache."""
    chunks = load_chunks(run)[:n]
    result = {}
    with tempfile.TemporaryDirectory() as tmp:
        gen = LocalGenerator(recipe, ResponseCache(Path(tmp) / "unused.sqlite"), Path(tmp))
        gen._load()  # loaded once, outside the timings
        for shared in (False, True):
            gen.cache = ResponseCache(Path(tmp) / f"{shared}.sqlite")  # empty: nothing comes from cache
            gen.engine, gen.share_prompt_cache = "plain", shared
            t0 = time.perf_counter()
            gen.generate(chunks, Counter())
            result["shared" if shared else "plain"] = (time.perf_counter() - t0) / len(chunks)
            gen.cache.close()
    return result


def report(args, manifest, rows, baseline, load: float) -> str:
    c, m = manifest.counts, manifest.metrics
    rejected = c["rejected"]
    usable = c["kept"] + rejected.get("over_quota", 0)
    gen_s = m["seconds_generate"]
    lines = [
        f"## sdg `local` on SciFact ({c['chunks_processed']} chunks of a {c['chunks']}-chunk corpus, "
        f"{args.samples_per_chunk} samples/chunk, queries_per_chunk={args.queries_per_chunk})",
        "",
        "| figure | value |",
        "|---|---|",
        f"| chunks processed | {c['chunks_processed']} |",
        f"| samples generated | {c['generated']} |",
        f"| usable (passed every filter, before the per-chunk cap) | {usable} "
        f"({usable / c['generated']:.0%}) |",
        f"| usable per chunk | {usable / c['chunks_processed']:.2f} |",
        f"| kept (after cap) | {c['kept']} ({m['queries_per_chunk']:.2f}/chunk) |",
        f"| chunks without a query | {c['chunks_without_queries']} |",
        f"| stage seconds (model loads + generation + filters) | {m['seconds']:.1f} |",
        f"| generation seconds (incl. SmolLM2 load) | {gen_s:.1f} |",
        f"| filter seconds (MiniLM load, corpus + query encoding) | {m['seconds_filter']:.1f} |",
        f"| chunks/s, generation only | {c['chunks_processed'] / gen_s:.2f} |",
        f"| chunks/s, whole stage | {m['chunks_per_second']:.2f} |",
        f"| kept queries/s, whole stage | {m['queries_per_second']:.2f} |",
        f"| 1-min load average at the end (2 cores) | {load:.1f} |",
        "",
        "| rejected because | count | share of samples |",
        "|---|---|---|",
        *(f"| {r} | {n} | {n / c['generated']:.0%} |"
          for r, n in sorted(rejected.items(), key=lambda x: -x[1])),
    ]
    ranks = [r["roundtrip_rank"] for r in rows if r.get("roundtrip_rank")]
    if ranks:
        bins = Counter("1" if r == 1 else "2-5" if r <= 5 else "6-20" if r <= 20 else ">20" for r in ranks)
        lines += ["", "| round-trip rank of the source chunk (kept) | queries |", "|---|---|",
                  *(f"| {b} | {bins.get(b, 0)} |" for b in ("1", "2-5", "6-20", ">20"))]
    if baseline:
        lines += ["", f"| sampling, {args.baseline_chunks} chunks | s/chunk | speed-up |", "|---|---|---|",
                  f"| plain generate(num_return_sequences) | {baseline['plain']:.2f} | 1.00 |",
                  f"| shared prompt cache (ours) | {baseline['shared']:.2f} | "
                  f"{baseline['plain'] / baseline['shared']:.2f} |"]
    lines += ["", "Examples of kept queries:", *(f"- {r['text']}" for r in rows[:8])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
