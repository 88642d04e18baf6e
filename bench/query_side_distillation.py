"""Ablation: distil the hybrid teacher into the query tower alone, passages frozen (issue 9).

The idea: queries are short, so training only the query side is cheap, and with the corpus frozen every
document is a negative. The query tower learns the KL to softmax(teacher / T) over the whole corpus,
where the teacher is the base model fused with BM25 (:func:`embedtune.evaluate.hybrid.fuse`). Then real
test queries go through the trained query tower and are scored against the *base* passage embeddings.
If this closed the gap to the teacher, the product would ship it as a sentence-transformers ``Router``
model (query and document routes). It did not on SciFact (README, "What each ingredient did").

Training queries come from a run's ``sdg/queries.jsonl`` (``--queries``; each row's ``doc_id`` must be a
document of ``--dataset``), or ``--ict N``: N random sentences of the corpus (inverse cloze).

    PYTHONPATH=src .venv/bin/python bench/query_side_distillation.py --queries runs/X/sdg/queries.jsonl
        [--lr 5e-5] [--epochs 3] [--ict 2]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = next((p / "shared" / "data" for p in Path(__file__).resolve().parents
               if (p / "shared" / "data" / "scifact").is_dir()), Path("../shared/data"))


def main() -> int:
    args = parse_args()
    from embedtune.config import ModelConfig
    from embedtune.console import console, setup_logging
    from embedtune.evaluate import EmbeddingCache, RankingSpec, evaluate_embeddings, load_beir, load_encoder
    from embedtune.models import encode_queries, load_model
    from embedtune.retrieval.cache import default_cache_dir, encode_cached

    setup_logging(False)
    data = load_beir(args.dataset, "test")
    dids = list(data.corpus)
    texts = data.passages(dids)
    queries = training_queries(args, data)
    console.print(f"{len(queries)} training queries, {len(dids)} documents")
    encoder = load_encoder(ModelConfig(name=args.model), "base", 64)
    docs = encode_cached(encoder, texts, "passage", EmbeddingCache(default_cache_dir() / "bench-eval"),
                         what=f"{data.name} corpus")
    model = load_model(args.model)
    teacher = teacher_scores(queries, encode_queries(model, queries) @ docs.T, texts, args.bm25_weight)
    qids = list(data.queries)
    test = [data.queries[q] for q in qids]
    base = evaluate_embeddings(data, qids, encode_queries(model, test), dids, docs, RankingSpec((10,)))
    started = time.perf_counter()
    train_query_tower(model, queries, teacher, docs, args)
    seconds = time.perf_counter() - started
    tuned = evaluate_embeddings(data, qids, encode_queries(model, test), dids, docs, RankingSpec((10,)))
    label = f"query tower distilled ({len(queries)} queries, lr {args.lr}, {args.epochs} epochs, {seconds:.0f} s)"
    console.print("| model | nDCG@10 | Recall@10 |\n|---|---|---|")
    for name, m in (("base", base), (label, tuned)):
        console.print(f"| {name} | {m['ndcg@10']:.4f} | {m['recall@10']:.4f} |")
    gain = tuned["ndcg@10"] - base["ndcg@10"]
    console.print(f"nDCG@10 change: {gain:+.4f} ({gain / base['ndcg@10']:+.1%} relative)")
    return 0


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dataset", type=Path, default=SHARED / "scifact")
    ap.add_argument("--queries", type=Path, help="sdg/queries.jsonl of a run on this corpus")
    ap.add_argument("--ict", type=int, default=0, help="instead: this many random sentences per document")
    ap.add_argument("--model", default="default")
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.05, help="of teacher and student softmax")
    ap.add_argument("--bm25-weight", type=float, default=0.5, help="BM25's weight in the teacher")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.queries and not args.ict:
        ap.error("give --queries FILE or --ict N")
    return args


def training_queries(args: argparse.Namespace, data) -> list[str]:
    """Query texts, deduplicated (the teacher, not the source document, labels them)."""
    rng = random.Random(args.seed)
    pairs: list[tuple[str, str]] = []
    if args.ict:
        for did, doc in data.corpus.items():
            sentences = [s for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", doc.get("text", ""))
                         if 6 <= len(s.split()) <= 40]
            pairs += [(s, did) for s in rng.sample(sentences, min(args.ict, len(sentences)))]
    else:
        with args.queries.open(encoding="utf-8") as fh:
            rows = [json.loads(line) for line in fh if line.strip()]
        pairs = [(r["text"].strip(), r["doc_id"]) for r in rows if r.get("doc_id") in data.corpus]
    seen: set[str] = set()
    return [q for q, _ in pairs if not (q.lower() in seen or seen.add(q.lower()))]


def teacher_scores(queries: list[str], dense, texts: list[str], bm25_weight: float):
    import torch

    from embedtune.retrieval.bm25 import BM25Index
    from embedtune.retrieval.fusion import fuse

    lexical = BM25Index(texts).scores(queries)
    return fuse(torch.from_numpy(dense), torch.from_numpy(lexical), bm25_weight)


def train_query_tower(model, queries: list[str], teacher, docs, args: argparse.Namespace) -> None:
    """KL(teacher || student) over every document, the documents' embeddings fixed."""
    import torch
    import torch.nn.functional as F  # noqa: N812
    from tqdm import tqdm

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    corpus = torch.from_numpy(docs)
    steps = args.epochs * math.ceil(len(queries) / args.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warmup) * max(0.0, 1 - s / steps))
    model.max_seq_length, model_max = 64, model.max_seq_length  # queries only
    model.train()
    with tqdm(total=steps, desc="query tower", unit="step") as bar:
        for _ in range(args.epochs):
            order = list(range(len(queries)))
            rng.shuffle(order)
            for start in range(0, len(order), args.batch_size):
                idx = order[start:start + args.batch_size]
                features = model.preprocess([queries[i] for i in idx])
                emb = F.normalize(model(features)["sentence_embedding"], dim=-1)
                target = torch.softmax(teacher[idx] / args.temperature, -1)
                loss = F.kl_div(torch.log_softmax(emb @ corpus.T / args.temperature, -1), target,
                                reduction="batchmean")
                loss.backward()
                opt.step()
                sched.step()
                opt.zero_grad()
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
    model.eval()
    model.max_seq_length = model_max


if __name__ == "__main__":
    raise SystemExit(main())
