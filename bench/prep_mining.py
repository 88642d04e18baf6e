"""Hard-negative mining: memory and time of the blocked scorer, and what it mines on real data.

Part 1 (scale): random unit vectors standing in for 200,000 chunk embeddings (384 dims); a set of queries
mined (a) in blocks of ``--block`` queries (the stage's path) and (b) as one block, the full score matrix
(the baseline). Each runs in a fresh process so its peak RSS is its own. Prints time, peak memory, their
ratios, and the extrapolation to 50,000 queries.

Part 2 (real): SciFact's test queries against a subset of its corpus with the shipped MiniLM, its human
qrels as positives: for each margin rule, how many queries keep 5 negatives, how many of the plain top-5
non-positives the rule replaced (probable false negatives it avoided), score distributions.

    PYTHONPATH=src /work/main/.venv/bin/python bench/prep_mining.py [--candidates 200000 --queries 2048]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

SCIFACT = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "scifact"


def unit_rows(n: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def child(candidates: int, queries: int, dim: int, block: int) -> None:
    """Run one mining pass and print JSON with its time and the process's peak RSS."""
    from embedtune.prep.mining import mine_negatives

    cand = unit_rows(candidates, dim, 0)
    rng = np.random.default_rng(1)
    pos_idx = rng.integers(0, candidates, size=queries)
    q = cand[pos_idx] + 0.5 * unit_rows(queries, dim, 2)  # queries near their positive
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    mined = mine_negatives(q, cand, [[int(i)] for i in pos_idx], None, k=5, margin=0.95, block=block,
                           progress=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": seconds, "peak_mb": peak / 1024, "before_mb": before / 1024,
                      "negatives": sum(map(len, mined.neg_idx))}))


def run_child(args: argparse.Namespace, block: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--candidates", str(args.candidates), "--queries",
           str(args.queries), "--dim", str(args.dim), "--block", str(block)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def scale(args: argparse.Namespace) -> None:
    blocked = run_child(args, args.block)
    full = run_child(args, args.queries)
    per_q = blocked["seconds"] / args.queries
    print(f"\n## Scale: {args.candidates:,} candidates x {args.queries:,} queries, {args.dim} dims\n")
    print("| scoring | block | seconds | peak RSS MB | RSS above embeddings MB |")
    print("|---|---|---|---|---|")
    rows = (("blocked (stage)", blocked, args.block), ("one block (baseline)", full, args.queries))
    for name, r, b in rows:
        extra = r["peak_mb"] - r["before_mb"]
        print(f"| {name} | {b} | {r['seconds']:.2f} | {r['peak_mb']:.0f} | {extra:.0f} |")
    extra_ratio = (blocked["peak_mb"] - blocked["before_mb"]) / max(1, full["peak_mb"] - full["before_mb"])
    print(f"\ntime blocked/baseline = {blocked['seconds'] / full['seconds']:.2f}; "
          f"extra memory blocked/baseline = {extra_ratio:.2f}")
    full_gib = 50_000 * args.candidates * 4 / 2**30
    print(f"extrapolated to 50,000 queries: {per_q * 50_000 / 60:.1f} min on this machine, peak RSS "
          f"unchanged (~{blocked['peak_mb']:.0f} MB); one block would need {full_gib:.0f} GiB for the "
          "score matrix alone")


def real(n_docs: int, seed: int = 0) -> None:
    from embedtune.artifacts import read_jsonl
    from embedtune.models import encode_passages, encode_queries, load_model
    from embedtune.prep.mining import mine_negatives
    from embedtune.prep.report import score_stats

    if not SCIFACT.is_dir():
        print(f"\n(SciFact not found at {SCIFACT}; real-data part skipped)")
        return
    qrels: dict[str, list[str]] = {}
    for line in (SCIFACT / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, cid, _ = line.split("\t")
        qrels.setdefault(qid, []).append(cid)
    corpus = {d["_id"]: d for d in read_jsonl(SCIFACT / "corpus.jsonl")}
    needed = {c for cs in qrels.values() for c in cs}
    others = random.Random(seed).sample(sorted(set(corpus) - needed), max(0, n_docs - len(needed)))
    ids = sorted(needed) + others
    queries = {q["_id"]: q["text"] for q in read_jsonl(SCIFACT / "queries.jsonl") if q["_id"] in qrels}
    qids = sorted(queries)
    model = load_model("default")
    t0 = time.perf_counter()
    p_emb = encode_passages(model, [(corpus[i]["title"] + " " + corpus[i]["text"]).strip() for i in ids])
    t_enc = time.perf_counter() - t0
    q_emb = encode_queries(model, [queries[q] for q in qids])
    index = {c: i for i, c in enumerate(ids)}
    positives = [[index[c] for c in qrels[q]] for q in qids]
    print(f"\n## SciFact: {len(qids)} test queries, {len(ids):,} abstracts, all-MiniLM-L6-v2\n")
    print(f"encoding: {len(ids) / t_enc:.1f} abstracts/s\n")
    print("| rule | queries with 5 | with <4 | negatives | changed vs no rule | neg median | neg max "
          "| pos median |")
    print("|---|---|---|---|---|---|---|---|")
    baseline = None
    for margin_type, margin in (("abs", -10.0), ("perc", 1.0), ("perc", 0.95), ("abs", 0.05)):
        mined = mine_negatives(q_emb, p_emb, positives, None, k=5, margin=margin, margin_type=margin_type,
                               block=64, progress=False)
        baseline = baseline or mined  # abs -10 = threshold above every score: plain top-5 non-positives
        changed = sum(len(set(a) - set(b)) for a, b in zip(baseline.neg_idx, mined.neg_idx, strict=True))
        neg = score_stats([s for r in mined.neg_scores for s in r])
        pos = score_stats([s for r in mined.pos_scores for s in r])
        full = sum(len(n) == 5 for n in mined.neg_idx)
        short = sum(len(n) < 4 for n in mined.neg_idx)
        name = "none" if margin < 0 else f"{margin_type} {margin}"
        print(f"| {name} | {full} | {short} | {neg['count']} | {changed} | {neg['median']:.3f} | "
              f"{neg['max']:.3f} | {pos['median']:.3f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", type=int, default=200_000)
    ap.add_argument("--queries", type=int, default=2048)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--scifact-docs", type=int, default=1000)
    ap.add_argument("--child", action="store_true")
    args = ap.parse_args()
    if args.child:
        child(args.candidates, args.queries, args.dim, args.block)
        return
    scale(args)
    real(args.scifact_docs)


if __name__ == "__main__":
    main()
