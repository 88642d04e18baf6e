"""Evaluation jobs: a registered model, or a live deployment, scored on a BEIR dataset.

A model is loaded and scored with :func:`embedtune.evaluate.evaluate_model`. A deployment is scored
through its ``/v1/embeddings`` endpoint (what users actually call), then with the same metric code, so the
two figures are comparable. Results also carry the names NVIDIA's evaluator uses (``ndcg_cut_10``,
``recall_5``) next to embedtune's (``ndcg@10``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from embedtune.artifacts import write_json, write_text
from embedtune.platform import db
from embedtune.platform.settings import PlatformSettings

_NVIDIA_NAMES = {"ndcg": "ndcg_cut", "recall": "recall", "precision": "P", "map": "map_cut"}


def nvidia_names(metrics: dict[str, float]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        name, _, k = key.partition("@")
        if name in _NVIDIA_NAMES:
            out[f"{_NVIDIA_NAMES[name]}_{k}"] = value
    return out


def run_evaluation(job: db.Job, sessions: sessionmaker[Session], settings: PlatformSettings, progress) -> dict:  # noqa: ANN001
    from embedtune.evaluate import evaluate_model
    from embedtune.retrieval.beir import load_beir
    from embedtune.retrieval.encoders import EndpointEncoder
    from embedtune.retrieval.metrics import RankingSpec, evaluate_embeddings

    spec = job.spec
    progress.update(force=True, stage="load")
    dataset = load_beir(spec["_dataset_path"], spec.get("split", "test"))
    t0 = time.perf_counter()
    ranking = RankingSpec(tuple(spec["k_values"]), spec["top_k"])
    if spec.get("_deployment_url"):
        progress.update(force=True, stage="encode (deployment)")
        qids, dids = list(dataset.queries), list(dataset.corpus)
        from embedtune.platform.deployment_keys import deployment_key

        client = EndpointEncoder(spec["_deployment_url"], spec.get("_served_model") or "model",
                                 batch_size=spec["batch_size"], label="deployment",
                                 api_key=deployment_key(settings.data_dir, spec.get("_deployment_id", "")))
        q = client.encode([dataset.queries[i] for i in qids], "query")
        d = client.encode(dataset.passages(dids), "passage")
        metrics = evaluate_embeddings(dataset, qids, q, dids, d, ranking)
    else:
        from embedtune.models import load_model

        progress.update(force=True, stage="encode (model)")
        model = load_model(spec["_model_path"])
        metrics = evaluate_model(model, dataset, ranking, batch_size=spec["batch_size"])
    result: dict[str, Any] = {
        "target": spec.get("deployment") or spec.get("model"), "dataset": spec["dataset"],
        "split": spec.get("split", "test"), "queries": len(dataset.queries), "documents": len(dataset.corpus),
        "metrics": metrics, "metrics_nvidia": nvidia_names(metrics),
        "seconds": round(time.perf_counter() - t0, 2),
    }
    out = Path(job.run_dir)
    write_json(out / "results.json", result)
    write_text(out / "report.md", report_markdown(result))
    progress.update(force=True, stage="done", metrics=metrics)
    return result


def report_markdown(result: dict[str, Any]) -> str:
    rows = sorted(result["metrics"].items())
    lines = [f"# Evaluation of `{result['target']}` on `{result['dataset']}` ({result['split']})", "",
             f"{result['queries']} queries, {result['documents']} documents.", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in rows]
    return "\n".join(lines) + "\n"
