"""Benchmark: clean + sentence-split + token-bounded chunking of 10,000 documents.

Baseline measured in the same run: tokenising every document once with the same fast tokenizer (the floor
any token-bounded chunker pays). Documents: SciFact abstracts from ../shared/data (repeated with distinct ids
to reach the count) or, where that is absent, the demo corpus's stdlib docs.

    .venv/bin/python bench/corpus_chunking.py [--docs 10000]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from embedtune.corpus import chunk_documents
from embedtune.corpus.chunking import chunk_text  # noqa: F401  (documents what is measured)
from embedtune.corpus.clean import normalize
from embedtune.corpus.loaders import Document
from embedtune.models import load_model, max_tokens

SCIFACT = Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact" / "corpus.jsonl"


def documents(n: int) -> list[Document]:
    if SCIFACT.is_file():
        base = [json.loads(line) for line in SCIFACT.open()]
        texts = [(r["title"], r["text"]) for r in base]
    else:
        from embedtune.demo import MODULES, module_markdown

        texts = [(m, module_markdown(m)) for m in MODULES]
    return [Document(f"d{i}", texts[i % len(texts)][1], texts[i % len(texts)][0]) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=10_000)
    args = ap.parse_args()
    docs = documents(args.docs)
    model = load_model("default")
    tok = model.tokenizer
    budget = max_tokens(model) - 2

    t0 = time.perf_counter()
    for i in range(0, len(docs), 256):
        tok([d.text for d in docs[i : i + 256]], add_special_tokens=False)
    t_tok = time.perf_counter() - t0

    t0 = time.perf_counter()
    cleaned = [Document(d.id, normalize(d.text), d.title) for d in docs]
    chunks = list(chunk_documents(cleaned, tok, budget))
    t_chunk = time.perf_counter() - t0

    print("| step | seconds | docs/s | ratio to baseline |\n|---|---|---|---|")
    print(f"| baseline: tokenise each document once | {t_tok:.2f} | {len(docs) / t_tok:,.0f} | 1.00 |")
    print(f"| clean + split + chunk ({len(chunks):,} chunks, ≤{budget} tokens) | {t_chunk:.2f} | "
          f"{len(docs) / t_chunk:,.0f} | {t_chunk / t_tok:.2f} |")


if __name__ == "__main__":
    main()
