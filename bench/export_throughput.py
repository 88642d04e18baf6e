"""Encode throughput of the exported model vs plain PyTorch, and int8 quality vs fp32.

Baseline: ``SentenceTransformer.encode`` (torch fp32) on the same texts, measured in the same run.
Texts: short queries and 256-token passages (SciFact when ../shared/data is present, else generated).
Quality: int8 vs fp32 ONNX cosine on every text, and nDCG@10 on a SciFact subset (--ndcg-queries).
Also: the CPU's instruction set (int8 gains most with VNNI/AMX), what padding costs on a length-mixed
set (batches in arrival order vs length-sorted), and with ``--profile`` onnxruntime's per-op profile of
the int8 graph on the passages (time share per op type, and how much of it still runs in fp32).

    PYTHONPATH=src python bench/export_throughput.py --threads 2 --profile
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from embedtune.cpu import isa_summary

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ../shared/data next to the repository (a git worktree sits one level deeper, so look there too).
_REPO = Path(__file__).resolve().parents[1]
_CANDIDATES = [root / "shared" / "data" / "scifact" for root in (_REPO.parent, _REPO.parents[1])]
SHARED = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])


def texts(n_queries: int, n_passages: int) -> tuple[list[str], list[str]]:
    from embedtune.evaluate import load_beir

    if (SHARED / "corpus.jsonl").is_file():
        data = load_beir(SHARED)
        return list(data.queries.values())[:n_queries], data.passages(list(data.corpus)[:n_passages])
    from embedtune.convert.parity import probe_passages

    rng = random.Random(0)
    words = " ".join(probe_passages()).split()
    queries = [" ".join(rng.sample(words, 8)) for _ in range(n_queries)]
    return queries, [" ".join(rng.choices(words, k=300)) for _ in range(n_passages)]


def timed(encode: Callable[[list[str]], np.ndarray], items: list[str]) -> tuple[float, np.ndarray]:
    encode(items[:8])  # warm-up: first-run allocations and kernel selection
    t0 = time.perf_counter()
    out = encode(items)
    return len(items) / (time.perf_counter() - t0), out


def interleaved(backends: dict[str, Callable[[list[str]], np.ndarray]], items: list[str],
                rounds: int) -> dict[str, tuple[float, np.ndarray]]:
    """Best rate of each backend over ``rounds`` rounds that take turns: on cores shared with other jobs a
    slow spell then hits every backend alike instead of one, so the ratios stay meaningful."""
    best: dict[str, tuple[float, np.ndarray]] = {}
    for _ in range(rounds):
        for name, encode in backends.items():
            rate, out = timed(encode, items)
            if name not in best or rate > best[name][0]:
                best[name] = (rate, out)
    return best


def mixed_batches(enc, queries: list[str], passages: list[str], bs: int, rounds: int) -> tuple[float, float]:
    """texts/s on a shuffled query+passage mix: batches in arrival order vs the encoder's length sorting."""
    mixed = queries + passages
    random.Random(1).shuffle(mixed)

    def arrival(items: list[str]) -> np.ndarray:
        return np.concatenate([enc.run_tokens(enc.tokenize(items[s:s + bs])) for s in range(0, len(items), bs)])

    best = interleaved({"arrival": arrival, "sorted": lambda x: enc.encode(x, batch_size=bs)}, mixed, rounds)
    return best["arrival"][0], best["sorted"][0]


INT8_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul", "MatMulIntegerToFloat", "QAttention",
            "QGemm", "QLinearMatMul", "DequantizeLinear", "QuantizeLinear"}


def profile_ops(model_path: Path, tokens: dict[str, np.ndarray], threads: int, runs: int = 3) -> list[tuple]:
    """onnxruntime's profiler on ``runs`` passes over ``tokens``: [(op type, share, ms, int8?)], largest first."""
    import json

    import onnxruntime as ort

    from embedtune.retrieval.onnx import session_options

    opts = session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="embedtune-profile-")) / "ort")
    sess = ort.InferenceSession(str(model_path), sess_options=opts, providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in tokens.items() if k in names}
    feeds["dimensions"] = np.array([0], dtype=np.int64)  # clamped to 1 by the graph; pooling still runs in full
    for _ in range(runs):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by_op: dict[str, float] = {}
    for ev in events:
        if ev.get("cat") == "Node" and ev.get("name", "").endswith("_kernel_time"):
            op = ev.get("args", {}).get("op_name", "?")
            by_op[op] = by_op.get(op, 0.0) + ev["dur"] / 1000 / runs
    total = sum(by_op.values()) or 1.0
    return [(op, ms / total, ms, op in INT8_OPS) for op, ms in sorted(by_op.items(), key=lambda kv: -kv[1])]


def print_profile(rows: list[tuple], label: str) -> None:
    int8_share = sum(share for _, share, _, quantised in rows if quantised)
    print(f"\nonnxruntime profile, {label} (per pass; int8 kernels {int8_share:.0%} of op time, "
          f"fp32 {1 - int8_share:.0%}):\n| op type | share | ms | precision |\n|---|---:|---:|---|")
    for op, share, ms, q in rows:
        if share >= 0.005:
            print(f"| {op} | {share:.1%} | {ms:.1f} | {'int8' if q else 'fp32'} |")
    if any(op in ("Attention", "QAttention") for op, *_ in rows):
        print("(Attention/QAttention = fused QKV projection + scores + softmax + context; QAttention quantises "
              "only the QKV projection, the rest stays fp32. Pooling/normalise/Matryoshka ops are below 0.5%.)")


def ndcg_subset(encoders: dict, n_queries: int, n_docs: int) -> dict[str, float] | None:
    """nDCG@10 of each ONNX encoder on SciFact: the first n queries, their relevant docs + distractors."""
    from embedtune.evaluate import BeirDataset, RankingSpec, evaluate_embeddings, load_beir

    if n_queries <= 0 or not (SHARED / "corpus.jsonl").is_file():
        return None
    data = load_beir(SHARED)
    qids = list(data.queries)[:n_queries]
    relevant = {d for q in qids for d in data.qrels[q]}
    others = [d for d in data.corpus if d not in relevant][: max(0, n_docs - len(relevant))]
    dids = sorted(relevant) + others
    sub = BeirDataset({d: data.corpus[d] for d in dids}, {q: data.queries[q] for q in qids},
                      {q: data.qrels[q] for q in qids})
    out = {}
    for name, enc in encoders.items():
        q = enc.encode([sub.queries[i] for i in qids], batch_size=32)
        d = enc.encode(sub.passages(dids), batch_size=32)
        out[name] = evaluate_embeddings(sub, qids, q, dids, d, RankingSpec((1, 10)))["ndcg@10"]
    out["docs"], out["queries"] = len(dids), len(qids)
    return out


#: int8 variants built from the same fp32 graph: (quantise the fused attention's QKV, quantise FFN down).
#: "all" is the default export since both kept layers were measured to cost no quality; "conservative" is the
#: previous default (both fp32).
VARIANTS = {"conservative": (False, False), "attention": (True, False), "all": (True, True)}


def build_variant(folder: Path, name: str, reduce_range: bool | None, fuse: tuple[int, int]) -> Path:
    """A sibling folder sharing the export's tokenizer and metadata, with its own ``model.int8.onnx``."""
    from embedtune.convert.quantize import quantize_int8
    from embedtune.retrieval.onnx import MODEL_FILES

    out = folder.parent / f"{folder.name}-{name}{'-rr' if reduce_range else ''}"
    if (out / MODEL_FILES["int8"]).is_file():
        return out
    out.mkdir(exist_ok=True)
    for item in ("tokenizer", "embedtune.json", MODEL_FILES["fp32"]):
        if not (out / item).exists():
            (out / item).symlink_to(folder / item)
    attention, ffn_down = VARIANTS[name]
    quantize_int8(folder / MODEL_FILES["fp32"], out / MODEL_FILES["int8"], reduce_range=reduce_range,
                  exclude_sensitive=not ffn_down, fuse=fuse, quantize_attention=attention)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--queries", type=int, default=256)
    ap.add_argument("--passages", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; each backend's best counts")
    ap.add_argument("--ndcg-queries", type=int, default=100, help="0 skips the nDCG check")
    ap.add_argument("--ndcg-docs", type=int, default=1000)
    ap.add_argument("--export-dir", type=Path, default=None, help="reuse (or keep) the export here")
    ap.add_argument("--variants", default="", help=f"also time int8 variants in the same rounds: comma list of "
                    f"{', '.join(VARIANTS)} (conservative: QKV and FFN down fp32; attention: FFN down fp32; "
                    "all: both int8, the export's default)")
    ap.add_argument("--reduce-range", action="store_true",
                    help="7-bit weights everywhere (what a CPU without VNNI gets), to see its quality here")
    ap.add_argument("--profile", action="store_true",
                    help="onnxruntime per-op profile of every ONNX graph (fp32, int8, variants) on one passage batch")
    args = ap.parse_args()

    import torch

    from embedtune.config import ExportConfig
    from embedtune.convert.graph import backbone
    from embedtune.export import OnnxEncoder, export_onnx
    from embedtune.models import load_model
    from embedtune.retrieval.onnx import MODEL_FILES

    torch.set_num_threads(args.threads)
    model = load_model("default", device="cpu")
    folder = args.export_dir or Path(tempfile.mkdtemp(prefix="embedtune-bench-"))
    reduce_range = True if args.reduce_range else None
    if not (folder / "model.int8.onnx").is_file():
        cfg = ExportConfig(int8_reduce_range=reduce_range, gpu_precisions=[])  # the recipe's int8
        export_onnx(model, folder, cfg, source="default")
    queries, passages = texts(args.queries, args.passages)
    encoders = {p: OnnxEncoder(folder, p, threads=args.threads) for p in ("fp32", "int8")}
    config = backbone(model).config
    fuse = (config.num_attention_heads, config.hidden_size)
    for variant in filter(None, args.variants.split(",")):
        encoders[f"int8 {variant}"] = OnnxEncoder(build_variant(folder, variant, reduce_range, fuse), "int8",
                                                  threads=args.threads)
    bs = args.batch_size

    backends: dict[str, Callable[[list[str]], np.ndarray]] = {
        "torch": lambda x: model.encode(x, batch_size=bs, normalize_embeddings=True, convert_to_numpy=True)}
    backends |= {name: (lambda x, e=enc: e.encode(x, batch_size=bs)) for name, enc in encoders.items()}
    rows, vectors = [], {}
    for kind, items in (("queries", queries), ("passages (256 tok)", passages)):
        best = interleaved(backends, items, args.rounds)
        base = best["torch"][0]
        for name, (rate, vectors[(name, kind)]) in best.items():
            rows.append((kind, "torch fp32 (baseline)" if name == "torch" else f"onnx {name}", rate, rate / base))

    mixed = mixed_batches(encoders["int8"], queries, passages, bs, args.rounds)

    print(f"\nthreads={args.threads}, batch={bs}, best of {args.rounds} interleaved rounds, "
          f"{len(queries)} queries, {len(passages)} passages, "
          f"model=all-MiniLM-L6-v2, cpu cores visible={os.cpu_count()}, cpu: {isa_summary()}\n")
    print("| texts | backend | texts/s | × torch |\n|---|---|---:|---:|")
    for kind, name, rate, ratio in rows:
        print(f"| {kind} | {name} | {rate:.1f} | {ratio:.2f} |")

    print(f"\nonnx int8 on shuffled queries+passages: {mixed[0]:.1f} texts/s in arrival order, {mixed[1]:.1f} "
          f"length-sorted ({mixed[1] / mixed[0]:.2f}x: the padding a mixed batch pays)")
    if args.profile:
        tokens = encoders["int8"].tokenize(passages[:bs])
        for name, enc in encoders.items():
            print_profile(profile_ops(enc.folder / MODEL_FILES[enc.precision], tokens, args.threads),
                          f"{name}, one batch of {bs} passages x {tokens['input_ids'].shape[1]} tokens")

    print("\n| check | min cosine | mean cosine |\n|---|---:|---:|")
    kinds = ("queries", "passages (256 tok)")
    for a in encoders:
        b = "torch" if a == "fp32" else "fp32"
        cos = np.concatenate([(vectors[(a, k)] * vectors[(b, k)]).sum(1) for k in kinds])
        print(f"| onnx {a} vs {b} | {cos.min():.5f} | {cos.mean():.5f} |")

    nd = ndcg_subset(encoders, args.ndcg_queries, args.ndcg_docs)
    if nd:
        print(f"\nSciFact subset ({nd['queries']} queries, {nd['docs']} docs), nDCG@10, tolerance 0.01"
              f"{' (7-bit weights)' if args.reduce_range else ''}:")
        for name in encoders:
            print(f"  {name}: {nd[name]:.4f} (Δ vs fp32 {nd[name] - nd['fp32']:+.4f})")


if __name__ == "__main__":
    main()
