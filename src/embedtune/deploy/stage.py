"""The deploy stage (the recipe's sixth): a release gate, the corpus reindexed with what won, and the
deployed search checked against eval before anyone is served by it.

1. **Gate** (:func:`embedtune.retrieval.release.decide` on ``eval/results.json``): the challenger (the
   fine-tuned model's best retrieval) replaces the champion (what the index serves now, else the base
   model's best retrieval) only if the paired interval of their nDCG@10 difference lies above
   ``deploy.min_gain``; ``deploy.force`` deploys it anyway. No eval results: the base model stays.
2. **Precision**: a fine-tuned winner is served from its ONNX export, int8 on a CPU unless int8 failed the
   export's parity gate or, on a CPU without int8 dot products, is not faster there than fp32
   (:mod:`embedtune.retrieval.speed_probe`), else from ``finetune/model``; the base model from its own folder.
3. **Reindex** into a new collection (:mod:`embedtune.deploy.index`).
4. **Check**: the deciding query set run through the store, beside the same vectors in-process and beside
   eval's own figure for the deployed retrieval (when eval scored the same chunks). Only a passing check
   swaps the alias: a failed deployment never replaces a working one.

Writes ``deploy/decision.json`` (what is served and why, with the paired figures), ``deploy/check.json``,
``deploy/index.json`` + ``dense_stats.npz`` (+ ``milvus.db`` with the embedded default).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from embedtune.artifacts import ArtifactError, Manifest, RunDir, config_hash, read_json, write_json
from embedtune.config import Recipe
from embedtune.console import log
from embedtune.deploy import index as reindex
from embedtune.retrieval import milvus
from embedtune.retrieval.beir import BeirDataset, load_beir
from embedtune.retrieval.deployed import against_eval, evaluate_index
from embedtune.retrieval.deployment import INFO_FILE, STATS_FILE, relative_to_run, settings_of
from embedtune.retrieval.encoders import ServedModel, served_model
from embedtune.retrieval.release import Decision, decide, without_evaluation

DECISION_FILE = "decision.json"
CHECK_FILE = "check.json"


class DeployCheckError(ArtifactError):
    """The deployed search does not reproduce eval: the new collection is not put behind the alias."""


def run_deploy(recipe: Recipe, run: RunDir, *, force: bool = False) -> Manifest:
    """Gate, reindex, check, swap; skipped when the decision, the model and the chunks are unchanged."""
    chunks_path = run.require("corpus", "chunks.jsonl")
    results = _eval_results(run)
    decision = gate(recipe, run, results)
    model = model_for(decision, recipe, run)
    cfg = recipe.index
    alias, uri = reindex.collection_alias(cfg, run), reindex.store_uri(cfg, run)
    dims = decision.retrieval.dims or cfg.dimensions
    weight = decision.bm25_weight if decision.bm25_weight is not None else (
        cfg.bm25_weight if cfg.bm25_weight is not None else recipe.eval.hybrid_bm25_weight)
    inputs = [chunks_path] + [p for p in (run.path("eval", "results.json"), Path(model.path)) if p.exists()]
    config = {"index": cfg.model_dump(mode="json", exclude={"timeout", "keep_previous"}), "alias": alias,
              "uri": uri, "model": {"kind": model.kind, "path": model.path, "precision": model.precision},
              "deployed": decision.deployed, "dims": dims, "bm25_weight": weight, "mode": decision.retrieval.mode,
              "deploy": recipe.deploy.model_dump(mode="json"), "language": recipe.corpus.language,
              "stopwords": recipe.eval.bm25_stopwords}
    stage = run.stage("deploy", config, inputs=inputs)
    client = milvus.connect(uri, reindex.token(cfg), cfg.timeout)
    try:
        if (done := stage.up_to_date(force)) is not None:
            if reindex.still_served(client, alias, done.counts.get("collection"), done.counts.get("chunks")):
                return done
            stage.up_to_date(force=True)  # the store lost it: drop the stale manifest before rebuilding
        collection = f"{alias}__{config_hash([config, stage.inputs])[:12]}"
        mode = decision.retrieval.mode
        encoder = model.load(recipe.model, cfg.batch_size)  # loaded once: it fills the index and checks it
        info, seconds = reindex.build(client, collection, cfg, recipe, model, chunks_path, stage.dir, weight,
                                      dims, "dense" if mode == "dense" else "hybrid", encoder)
        check = _check(client, collection, info, recipe, run, results, decision, encoder) if (
            recipe.deploy.check and results is not None) else {"skipped": "no eval results" if results is None
                                                                else "deploy.check is off"}
        write_json(stage.dir / CHECK_FILE, check)
        if check.get("passed") is False:
            client.drop_collection(collection)
            raise DeployCheckError(f"the deployed search does not reproduce eval (details in "
                                   f"{stage.dir / CHECK_FILE}):\n  " + "\n  ".join(check["failures"]))
        previous = reindex.swap(client, alias, collection, cfg.keep_previous)
    finally:
        milvus.release(client, uri)  # Lite: free the file for the server or `embedtune search`
    # Paths inside the run are stored relative to it: the run directory can be moved or read from anywhere.
    stored_uri = reindex.LITE_FILE if cfg.uri is None else uri
    info = info.model_copy(update={"alias": alias, "uri": stored_uri, "token_env": cfg.token_env,
                                   "model_path": relative_to_run(model.path, run.root)
                                   if decision.retrieval.model != "base" else model.path})
    write_json(stage.dir / INFO_FILE, info.model_dump(mode="json"))
    record = decision_record(decision, model, info, check)
    write_json(stage.dir / DECISION_FILE, record)
    log.info("deploy: %s", record["served"])
    return stage.finish(outputs=[stage.dir / DECISION_FILE, stage.dir / INFO_FILE, stage.dir / STATS_FILE,
                                 stage.dir / CHECK_FILE],
                        counts={"chunks": info.chunks, "dimension": info.dimension, "collection": collection,
                                "previous_collection": previous, "deployed": decision.deployed,
                                "challenger_won": decision.challenger_won, "forced": decision.forced},
                        metrics={"chunks_per_second": round(info.chunks / max(seconds, 1e-9), 2),
                                 "bm25_weight": weight})


def gate(recipe: Recipe, run: RunDir, results: dict[str, Any] | None) -> Decision:
    """The release decision: on eval's per-query scores, against what the index serves now."""
    cfg = recipe.deploy
    if results is None or not (results.get("per_query") or {}).get("ndcg@10"):
        return without_evaluation(finetuned=run.manifest("finetune") is not None, hybrid=recipe.index.bm25,
                                  force=cfg.force)
    decision = decide(results, champion=_serving(run), force=cfg.force, min_gain=cfg.min_gain,
                      confidence=cfg.confidence)
    if not recipe.index.bm25 and decision.retrieval.mode != "dense":
        raise ValueError(f"the release gate chose {decision.retrieval.label}, which needs BM25, but index.bm25 is "
                         "off: turn it on, or set eval.bm25=false so that only dense retrievals compete")
    return decision


def model_for(decision: Decision, recipe: Recipe, run: RunDir) -> ServedModel:
    """The weights that serve ``decision`` on this machine."""
    base = reindex.base_path(recipe)
    if decision.retrieval.model != "finetuned":
        return ServedModel("torch", base, None, "base")
    model = served_model(run.root, base)
    if model.label == "base":
        raise ArtifactError(f"the release gate chose the fine-tuned model, but {run.root} holds none "
                            "(finetune/model or export/)")
    return model


def decision_record(decision: Decision, model: ServedModel, info: Any, check: dict[str, Any]) -> dict[str, Any]:
    """``deploy/decision.json``: the gate's figures and exactly what is served."""
    record = decision.to_json()
    weights = f", BM25 weight {info.bm25_weight}" if info.mode == "hybrid" else ""
    record.update(model_label=model.label, model_kind=model.kind, precision=model.precision,
                  dimension=info.dimension, collection=info.collection, alias=info.alias,
                  check={k: check.get(k) for k in ("passed", "skipped", "failures", "queries") if k in check},
                  served=f"{decision.retrieval.label} ({model.label}, {info.dimension} dims, {info.mode} "
                         f"search{weights}) — {decision.reason}")
    return record


def read_decision(run: RunDir) -> dict[str, Any] | None:
    path = run.path("deploy", DECISION_FILE)
    return read_json(path) if run.manifest("deploy") is not None and path.is_file() else None


def _serving(run: RunDir) -> str | None:
    """The retrieval a previous deployment of this run serves (the champion to beat), if any."""
    previous = read_decision(run)
    return previous.get("deployed") if previous else None


def _eval_results(run: RunDir) -> dict[str, Any] | None:
    path = run.path("eval", "results.json")
    return read_json(path) if run.manifest("eval") is not None and path.is_file() else None


def _check(client, collection: str, info: Any, recipe: Recipe, run: RunDir, results: dict[str, Any],
           decision: Decision, encoder: Any) -> dict[str, Any]:
    """The deciding query set through the new collection: vs the same vectors in-process (the store's own
    search and fusion), and vs eval's figure for the deployed retrieval when eval scored these chunks."""
    dataset = deciding_dataset(recipe, run, results)
    stats_path = run.path("deploy", STATS_FILE)
    searcher = milvus.MilvusSearcher(client, collection, lambda texts: encoder.encode(texts, "query"),
                                     info.dimension, settings_of(info),
                                     milvus.DenseStats.load(stats_path) if stats_path.is_file() else None)
    mode = decision.retrieval.mode
    result = evaluate_index(searcher, dataset, recipe.eval.k_values, modes=(mode,),
                            stopwords=recipe.eval.bm25_stopwords)
    out = result.to_json()
    expected = _eval_figures(results, decision)
    same_chunks = result.level == "chunk" and results.get("n_docs") == info.chunks
    if same_chunks and expected:
        out["failures"] += against_eval(result.deployed[mode], expected, recipe.export.tolerance_low_k,
                                        recipe.export.tolerance_high_k)
        out["against_eval"] = "compared"
    else:
        out["against_eval"] = ("not compared: eval scored its own corpus (documents), the index holds chunks; "
                               "the store is compared with the same chunks in-process")
    out["eval"] = expected
    out["passed"] = not out["failures"]
    out["dataset"] = dataset.name
    log.info("deploy check on %d queries (%s-level qrels): %s", result.queries, result.level,
             "passed" if out["passed"] else "FAILED")
    return out


def deciding_dataset(recipe: Recipe, run: RunDir, results: dict[str, Any]) -> BeirDataset:
    """The query set the gate decided on: the user's (minus examples), else the synthetic held-out set."""
    cfg = recipe.eval
    if cfg.dataset and results.get("role") == "your real queries":
        dataset = load_beir(Path(cfg.dataset).expanduser(), cfg.split,
                            Path(cfg.queries).expanduser() if cfg.queries else None)
        for q in set(results.get("excluded_examples") or ()):
            dataset.queries.pop(q, None)
            dataset.qrels.pop(q, None)
        return dataset
    dataset = load_beir(run.require("prep", "eval"), "test")
    dataset.name = f"{run.root.name} held-out"
    return dataset


def _eval_figures(results: dict[str, Any], decision: Decision) -> dict[str, float]:
    r = decision.retrieval
    if r.mode == "hybrid":
        return dict((results.get("hybrid") or {}).get(r.model or "", {}))
    if r.mode == "bm25":
        return dict(results.get("bm25") or {})
    if r.dims:
        return dict(((results.get("matryoshka") or {}).get(r.model or "") or {}).get(str(r.dims), {}))
    return {k: v for k, v in (results.get(r.model or "") or {}).items() if isinstance(v, float)}
