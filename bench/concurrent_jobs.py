"""Benchmark: two pipeline jobs on one machine, against one alone (issue 30, item 5).

Runs the sdg stage (the local query writer, the longest stage) on the same chunks three ways, in one sitting:
one job alone; two jobs at once sharing the cores (the default: ``embedtune.cpu_share``); two jobs at once
each pinned to every core (``EMBEDTUNE_THREADS=<cores>``: what every job did before the share). Prints the
generation rate of each job (chunks/s, from the sdg manifest), the machine's total, and the ratios to alone.

    PYTHONPATH=src .venv/bin/python bench/concurrent_jobs.py [--chunks 16] [--out /tmp/concurrent]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHARED = next((p / "shared" / "data" for p in Path(__file__).resolve().parents
               if (p / "shared" / "data" / "scifact").is_dir()), Path("../shared/data"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from embedtune.cpu import isa_summary  # noqa: E402
from embedtune.cpu_share import available_cores  # noqa: E402


def small_corpus(out: Path, docs: int) -> Path:
    """The first ``docs`` SciFact abstracts: the sdg filters encode the whole corpus, which is not measured."""
    path = out / "corpus.jsonl"
    with (SHARED / "scifact" / "corpus.jsonl").open() as src:
        path.write_text("".join(line for _, line in zip(range(docs), src, strict=False)))
    return path


def launch(run_dir: Path, chunks: int, env: dict[str, str], corpus: Path) -> subprocess.Popen:
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "embedtune", "run", "--corpus", str(corpus),
           "-r", str(run_dir), "--to", "sdg", "-o", f"sdg.max_chunks={chunks}"]
    log = (run_dir.parent / f"{run_dir.name}.log").open("w")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def rate(run_dir: Path) -> float:
    """Chunks per second of query writing (model loading and the filters left out)."""
    manifest = json.loads((run_dir / "sdg" / "manifest.json").read_text())
    return manifest["counts"]["chunks_processed"] / manifest["metrics"]["seconds_generate"]


def run_mode(name: str, jobs: int, args: argparse.Namespace, pinned: bool) -> list[float]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "EMBEDTUNE_CPU_SHARE_DIR": str(args.out / "share")}
    env.pop("OMP_NUM_THREADS", None)
    if pinned:
        env["EMBEDTUNE_THREADS"] = str(available_cores())
    else:
        env.pop("EMBEDTUNE_THREADS", None)
    started = time.perf_counter()
    dirs = [args.out / f"{name}-{i}" for i in range(jobs)]
    procs = {d: launch(d, args.chunks, env, args.corpus) for d in dirs}
    for run_dir, proc in procs.items():
        if proc.wait() != 0:
            raise SystemExit(f"{name}: the job in {run_dir} failed; see {run_dir}.log")
    rates = [rate(d) for d in procs]
    print(f"{name}: {len(rates)} job(s), {time.perf_counter() - started:.0f} s wall, "
          + ", ".join(f"{r:.3f}" for r in rates) + " chunks/s", flush=True)
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=16, help="chunks each job writes queries for")
    ap.add_argument("--corpus-docs", type=int, default=200, help="SciFact abstracts in the jobs' corpus")
    ap.add_argument("--out", type=Path, default=Path("/tmp/concurrent-jobs"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    args.corpus = small_corpus(args.out, args.corpus_docs)
    print(f"cpu: {isa_summary()}; {available_cores()} cores; {args.chunks} chunks per job\n", flush=True)
    alone = run_mode("alone", 1, args, pinned=False)[0]
    rows = [("one job alone", [alone]),
            ("two jobs, shared cores (default)", run_mode("shared", 2, args, pinned=False)),
            (f"two jobs, {available_cores()} threads each (before)", run_mode("pinned", 2, args, pinned=True))]
    print("\n| mode | chunks/s per job | machine total | total vs alone |\n|---|---|---|---|")
    for name, rates in rows:
        print(f"| {name} | {' / '.join(f'{r:.3f}' for r in rates)} | {sum(rates):.3f} | "
              f"{sum(rates) / alone:.2f}x |")


if __name__ == "__main__":
    main()
