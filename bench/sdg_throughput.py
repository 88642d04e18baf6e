"""sdg throughput: today's `local` generator path against the fast engine, in the same run, on the same
SciFact chunks (issue 23, item 1).

Both generators are loaded once (load time and resident memory reported apart), then generate for the
same chunks round by round, alternating which goes first, so that load from other jobs on a shared
machine falls on both alike. Each one's samples then go through the same filter chain (copy, length,
duplicates, round trip against a pool of ``--corpus-docs`` abstracts with the base embedder), which gives
the acceptance rate: usable queries (passed every filter, before the per-chunk cap) per sample.

    PYTHONPATH=src python bench/sdg_throughput.py --chunks 16 --rounds 2 --corpus-docs 200
    PYTHONPATH=src python bench/sdg_throughput.py --examples ../shared/data/scifact/examples.jsonl

``--examples`` gives the prompt the user's few-shot examples (``sdg.examples``): a prefix of up to
``sdg.local.max_prefix_tokens`` tokens instead of the generic 115, the case the shared-prefix attention is for.

Only ratios measured in one run mean something on a busy machine; the load average is printed.
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

from embedtune.artifacts import PeakRss  # noqa: E402
from embedtune.config import load_recipe  # noqa: E402
from embedtune.cpu import isa_summary  # noqa: E402
from embedtune.schemas import Chunk  # noqa: E402
from embedtune.sdg.cache import ResponseCache  # noqa: E402
from embedtune.sdg.examples import load_examples  # noqa: E402
from embedtune.sdg.filters import QueryFilter  # noqa: E402
from embedtune.sdg.local import LocalGenerator  # noqa: E402

SCIFACT = Path("shared", "data", "scifact", "corpus.jsonl")
DEFAULT_DATA = next((p / SCIFACT for p in Path(__file__).resolve().parents if (p / SCIFACT).is_file()),
                    Path("..") / SCIFACT)
ENGINES = {"today": {"engine": "plain", "int8": False}, "fast": {"engine": "fast", "int8": True},
           "fast-fp32": {"engine": "fast", "int8": False}}
PATHS: dict[str, dict] = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--chunks", type=int, default=16, help="chunks both paths generate for")
    ap.add_argument("--rounds", type=int, default=2, help="the chunks are split into this many rounds")
    ap.add_argument("--corpus-docs", type=int, default=200, help="abstracts in the round-trip pool")
    ap.add_argument("--paths", default="today,fast",
                    help=f"comma-separated, from {', '.join(ENGINES)} (fast-fp32: the fast engine without int8)")
    ap.add_argument("--examples", type=Path, default=None,
                    help="a JSONL of example queries (sdg.examples) for the few-shot prompt")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--override", action="append", default=[],
                    help="recipe override, e.g. sdg.local.batch_size=8")
    args = ap.parse_args()
    unknown = [name for name in args.paths.split(",") if name not in ENGINES]
    if unknown:
        ap.error(f"--paths: unknown {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    PATHS.update({name: ENGINES[name] for name in args.paths.split(",")})

    docs = [json.loads(line) for line in args.data.open(encoding="utf-8")]
    random.Random(args.seed).shuffle(docs)
    pool = [chunk_of(d) for d in docs[: args.corpus_docs]]
    chunks = pool[: args.chunks]
    recipe = load_recipe(None, [f"sdg.seed={args.seed}", *([f"sdg.local.threads={args.threads}"] if args.threads
                                                             else []), *args.override])
    examples = load_examples(args.examples, [chunk_of(d) for d in docs]) if args.examples else []
    with tempfile.TemporaryDirectory() as tmp:
        gens, loads = load_generators(recipe, Path(tmp), examples)
        seconds, peaks, candidates = generate_in_rounds(gens, chunks, args.rounds)
        prefix = prefix_line(next(iter(gens.values())), args.examples)
        accepted = {name: usable(recipe, gens[name], pool, candidates[name], Path(tmp) / "emb") for name in gens}
    print(report(args, recipe, chunks, prefix, loads, seconds, peaks, candidates, accepted))


def prefix_line(gen, examples_file) -> str:
    """Which few-shot prefix the prompts started with, and its length in tokens."""
    tokens = len(gen._load()[1].encode(gen.prompt_prefix(), add_special_tokens=False))
    shown = f"{len(gen.examples_used)} examples from {examples_file}" if examples_file else "the generic examples"
    return f"{shown}, {tokens} tokens"


def chunk_of(doc: dict) -> Chunk:
    return Chunk(_id=f"{doc['_id']}#0", doc_id=str(doc["_id"]), title=doc.get("title", ""), text=doc["text"])


def load_generators(recipe, tmp: Path, examples):
    gens, loads = {}, {}
    for name, opts in PATHS.items():
        gen = LocalGenerator(recipe, ResponseCache(tmp / f"{name}.sqlite"), tmp)
        gen.engine, gen.int8 = opts["engine"], opts["int8"]
        gen.examples = examples
        before = PeakRss().start().stop()
        t0 = time.perf_counter()
        gen._load()
        if gen.engine == "fast":
            gen._prefix_cache()
        loads[name] = {"seconds": time.perf_counter() - t0, "rss_added_mb": PeakRss().start().stop() - before}
        gens[name] = gen
    return gens, loads


def generate_in_rounds(gens, chunks, rounds: int):
    seconds, peaks, candidates = Counter(), Counter(), {name: [] for name in gens}
    size = -(-len(chunks) // rounds)
    for r in range(rounds):
        part = chunks[r * size:(r + 1) * size]
        order = list(gens) if r % 2 == 0 else list(reversed(gens))
        for name in order:
            rss = PeakRss().start()
            t0 = time.perf_counter()
            candidates[name] += gens[name].generate(part, Counter())
            seconds[name] += time.perf_counter() - t0
            peaks[name] = max(peaks[name], rss.stop())
    return seconds, peaks, candidates


def usable(recipe, gen, pool, candidates, cache_dir: Path) -> dict[str, object]:
    """The shared filter chain, without the per-chunk cap: what share of samples is usable."""
    counts: Counter[str] = Counter()
    gen.oversamples = False  # count usable samples, not those left after queries_per_chunk
    result = QueryFilter(recipe, gen, pool, counts, cache_dir).apply(list(candidates))
    return {"kept": len(result.kept), "reasons": result.reasons,
            "chunks_with_query": len({c.source for c in result.kept})}


def report(args, recipe, chunks, prefix, loads, seconds, peaks, candidates, accepted) -> str:
    cfg = recipe.sdg.local
    load = os.getloadavg()
    lines = [
        f"## sdg `local`: today's path vs the fast engine ({len(chunks)} SciFact chunks, {cfg.samples_per_chunk} "
        f"samples/chunk, batch_size {cfg.batch_size}, max_passage_tokens {cfg.max_passage_tokens}, "
        f"{args.rounds} alternating rounds; few-shot prefix: {prefix})",
        "",
        f"CPU: {isa_summary()}, {os.cpu_count()} cores, load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} at the end (others' jobs share the cores)",
        "",
        "| path | load s | RSS added by load (MB) | generate s | samples/s | usable | acceptance | "
        "usable queries/s | chunks with a query | peak RSS while generating (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in PATHS:
        n, s, kept = len(candidates[name]), seconds[name], accepted[name]["kept"]
        lines.append(f"| {name} | {loads[name]['seconds']:.1f} | {loads[name]['rss_added_mb']:.0f} | {s:.1f} | "
                     f"{n / s:.2f} | {kept} | {kept / max(n, 1):.0%} | {kept / s:.3f} | "
                     f"{accepted[name]['chunks_with_query']}/{len(chunks)} | {peaks[name]:.0f} |")
    base, *others = PATHS  # ratios against the first path named
    for name in others:
        ratio = seconds[base] / seconds[name]
        usable_ratio = (accepted[name]["kept"] / seconds[name]) / max(accepted[base]["kept"] / seconds[base], 1e-9)
        lines += ["", f"**samples/s ratio {name}/{base}: {ratio:.2f}x; usable queries/s ratio: {usable_ratio:.2f}x**"]
    reasons = sorted(set().union(*(accepted[name]["reasons"] for name in PATHS)))
    lines += ["", f"| rejected because | {' | '.join(PATHS)} |", "|---" * (len(PATHS) + 1) + "|"]
    lines += [f"| {r} | " + " | ".join(str(accepted[name]["reasons"].get(r, 0)) for name in PATHS) + " |"
              for r in reasons]
    for name in PATHS:
        lines += ["", f"{name}, first samples:", *(f"- {c.text}" for c in candidates[name][:6])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
