"""Index and search benchmark: the deployed Milvus search scored and timed.

Part 1 (``--scifact``): the SciFact corpus chunked and indexed with a run's served model (the base model
by default), then SciFact's real test claims run through the store (dense, BM25, hybrid with each
fusion: eval's z-score fusion over candidate lists, Milvus RRFRanker, Milvus WeightedRanker) beside the
same chunks scored in-process with eval's exact search and fusion. Build time, latency p50/p99, queries/s.

Part 2 (``--synthetic N``): N synthetic chunks (random unit vectors, texts drawn from a Zipf vocabulary)
inserted straight into a Milvus Lite collection, then dense and hybrid search latency, one query at a time
as a server sees them, and peak memory. Encoding is left out: it is measured in part 1 (chunks/s).

    python bench/index_search.py --scifact ../shared/data/scifact
    python bench/index_search.py --synthetic 200000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def latency(fn, queries: list[str], repeat: int = 1) -> dict[str, float]:
    """One query per call, as a server sees them: p50/p99 in ms and queries/s."""
    times = []
    t_all = time.perf_counter()
    for _ in range(repeat):
        for q in queries:
            t0 = time.perf_counter()
            fn(q)
            times.append((time.perf_counter() - t0) * 1000)
    total = time.perf_counter() - t_all
    return {"p50_ms": round(float(np.percentile(times, 50)), 2), "p99_ms": round(float(np.percentile(times, 99)), 2),
            "qps": round(len(times) / total, 1), "n": len(times)}


def scifact(data: Path, out: Path, fusions: list[str], latency_queries: int) -> dict:
    from embedtune.artifacts import RunDir
    from embedtune.config import load_recipe
    from embedtune.console import setup_logging
    from embedtune.corpus import run_corpus
    from embedtune.deploy import run_deploy
    from embedtune.retrieval.beir import load_beir
    from embedtune.retrieval.deployed import evaluate_index
    from embedtune.retrieval.deployment import open_searcher

    setup_logging()
    run = RunDir(out / "scifact-run")
    recipe = load_recipe(None, [f"corpus.path={data}", "name=scifact"])
    run_corpus(recipe, run)
    manifest = run_deploy(recipe, run)
    build = {"chunks": manifest.counts["chunks"], "seconds": manifest.seconds,
             "chunks_per_second": manifest.metrics["chunks_per_second"], "skipped": manifest.skipped}
    dataset = load_beir(data, "test")
    searcher = open_searcher(run.root, recipe.model)
    results: dict = {"build": build, "fusions": {}}
    for fusion in fusions:
        s = searcher.settings
        searcher.settings = s.model_copy(update={"fusion": fusion})
        modes = ("dense", "bm25", "hybrid") if fusion == fusions[0] else ("hybrid",)
        res = evaluate_index(searcher, dataset, modes=modes).to_json()
        results["fusions"][fusion] = res
        print(f"fusion {fusion}: " + ", ".join(
            f"{m} deployed {res['deployed'][m]['ndcg@10']:.4f} / in-process {res['exact'][m]['ndcg@10']:.4f}"
            for m in res["deployed"]), flush=True)
    texts = list(dataset.queries.values())[:latency_queries]
    results["latency"] = {}
    for mode in ("dense", "bm25", "hybrid"):
        searcher.settings = searcher.settings.model_copy(update={"fusion": fusions[0]})
        results["latency"][mode] = latency(lambda q, m=mode: searcher.search([q], mode=m, top_k=10), texts)
        print(f"latency {mode} (incl. query encoding): {results['latency'][mode]}", flush=True)
    results["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return results


def synthetic(n: int, out: Path, dim: int, queries: int, seed: int = 0) -> dict:
    from embedtune.retrieval import milvus

    rng = np.random.default_rng(seed)
    vocab = [f"w{i}" for i in range(30000)]
    zipf = 1.0 / np.arange(1, len(vocab) + 1)
    zipf /= zipf.sum()
    path = out / f"synthetic-{n}.db"
    client = milvus.connect(str(path))
    name = f"synthetic_{n}"
    t0 = time.perf_counter()
    if not client.has_collection(name) or milvus.row_count(client, name) != n:
        if client.has_collection(name):
            client.drop_collection(name)
        milvus.create_collection(client, name, dim, milvus.analyzer_params(None))
        stats = milvus.StatsAccumulator(dim)
        for start in range(0, n, 2000):
            m = min(2000, n - start)
            vec = rng.standard_normal((m, dim)).astype(np.float32)
            vec /= np.linalg.norm(vec, axis=1, keepdims=True)
            stats.add(vec)
            words = rng.choice(len(vocab), size=(m, 60), p=zipf)
            rows = [{"id": f"c{start + i}", "doc_id": f"d{(start + i) // 2}", "title": "", "source": "",
                     "text": " ".join(vocab[w] for w in words[i]), "dense": vec[i].tolist()} for i in range(m)]
            for s in range(0, m, 500):
                client.insert(name, rows[s:s + 500])
            if start % 20000 == 0:
                print(f"  inserted {start + m}/{n} ({(start + m) / (time.perf_counter() - t0):.0f} rows/s)", flush=True)
        client.flush(name)
        stats.result().save(out / f"synthetic-{n}-stats.npz")
    build_s = time.perf_counter() - t0
    client.load_collection(name)
    stats = milvus.DenseStats.load(out / f"synthetic-{n}-stats.npz")
    qvec = rng.standard_normal((queries, dim)).astype(np.float32)
    qvec /= np.linalg.norm(qvec, axis=1, keepdims=True)
    qtext = [" ".join(vocab[w] for w in rng.choice(len(vocab), size=8, p=zipf)) for _ in range(queries)]
    lookup = dict(zip(qtext, qvec, strict=True))
    searcher = milvus.MilvusSearcher(client, name, lambda texts: np.stack([lookup[t] for t in texts]), dim,
                                     milvus.SearchSettings(), stats)
    result = {"chunks": n, "build_seconds": round(build_s, 1), "latency": {}}
    for mode in ("dense", "bm25", "hybrid"):
        searcher.search(qtext[:2], mode=mode, top_k=10)  # warm-up (loads segments)
        result["latency"][mode] = latency(lambda q, m=mode: searcher.search([q], mode=m, top_k=10), qtext)
        print(f"{n} chunks, {mode}: {result['latency'][mode]}", flush=True)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scifact", type=Path, help="BEIR SciFact folder")
    parser.add_argument("--fusions", default="zscore,rrf,weighted")
    parser.add_argument("--latency-queries", type=int, default=100)
    parser.add_argument("--synthetic", type=int, default=0, help="chunks in the synthetic corpus (0: skip)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--out", type=Path, default=Path("bench/results/index"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"cpu_count": os.cpu_count()}
    if args.scifact:
        report["scifact"] = scifact(args.scifact, args.out, args.fusions.split(","), args.latency_queries)
    if args.synthetic:
        report["synthetic"] = synthetic(args.synthetic, args.out, args.dim, args.queries)
    if len(report) == 1:
        sys.exit("nothing to do: give --scifact DIR and/or --synthetic N")
    (args.out / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
