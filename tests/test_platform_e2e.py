"""End to end through the platform, as a team would use it: upload a prepared training set and a BEIR
validation set -> customization job (finetune + eval) on a tiny model -> fine-tuned model registered with
lineage -> deployment ready -> embeddings through the inference gateway with the official openai client ->
evaluation job against the deployment -> deployment deleted."""

from __future__ import annotations

import json
import random

import httpx
import numpy as np
import pytest

from _platform_process import Service, pid_alive, wait_for
from embedtune.platform.client import PlatformAPIError

TOPICS = {
    "astronomy": "stars planets galaxies telescopes orbit comets nebula gravity light years",
    "cooking": "recipes ovens flour butter baking sauces knives spices simmer dough",
    "finance": "stocks bonds interest rates inflation markets dividends banks loans",
    "sailing": "boats wind sails harbour knots tides rudder mast anchor crew",
}


def passages(seed: int = 0) -> dict[str, list[str]]:
    rng = random.Random(seed)
    return {t: [" ".join(rng.sample(w.split(), 7)).capitalize() + "." for _ in range(6)] for t, w in TOPICS.items()}


def training_jsonl(path, texts: dict[str, list[str]]):  # noqa: ANN001, ANN201
    rng = random.Random(1)
    rows = []
    for topic, docs in texts.items():
        others = [d for t, ds in texts.items() if t != topic for d in ds]
        for doc in docs:
            query = " ".join(rng.sample(doc.rstrip(".").lower().split(), 3))
            rows.append({"query": query, "pos_doc": doc, "neg_doc": rng.sample(others, 2)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def beir_folder(root, texts: dict[str, list[str]]):  # noqa: ANN001, ANN201
    (root / "qrels").mkdir(parents=True)
    corpus, queries, qrels = [], [], ["query-id\tcorpus-id\tscore"]
    for topic, docs in texts.items():
        for i, doc in enumerate(docs):
            corpus.append({"_id": f"{topic}-{i}", "title": "", "text": doc})
        queries.append({"_id": f"q-{topic}", "text": " ".join(TOPICS[topic].split()[:3])})
        qrels += [f"q-{topic}\t{topic}-{i}\t1" for i in range(len(docs))]
    (root / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in corpus))
    (root / "queries.jsonl").write_text("".join(json.dumps(r) + "\n" for r in queries))
    (root / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")
    return root


def ndcg_at_10(model_dir: str, texts: dict[str, list[str]]) -> float:
    """nDCG@10 of the model on beir_folder(texts), computed here (sentence-transformers + pytrec_eval)."""
    import pytrec_eval
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_dir, device="cpu")
    docs = {f"{t}-{i}": doc for t, ds in texts.items() for i, doc in enumerate(ds)}
    scores = model.encode([" ".join(TOPICS[t].split()[:3]) for t in texts], normalize_embeddings=True) @ \
        model.encode(list(docs.values()), normalize_embeddings=True).T
    run = {f"q-{t}": dict(zip(docs, map(float, row), strict=True)) for t, row in zip(texts, scores, strict=True)}
    qrels = {f"q-{t}": {d: 1 for d in docs if d.startswith(f"{t}-")} for t in texts}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return sum(q["ndcg_cut_10"] for q in per_query.values()) / len(per_query)


@pytest.fixture(scope="module")
def platform_e2e(tmp_path_factory, tiny_bert_dir):
    root = tmp_path_factory.mktemp("e2e")
    svc = Service(root / "data").start()
    pc = svc.client("team")
    pc.ensure_workspace()
    pc.register_model("tiny", tiny_bert_dir)
    texts = passages()
    pc.upload_dataset("train", training_jsonl(root / "training.jsonl", texts), format="training")
    pc.upload_dataset("val", beir_folder(root / "val", passages(seed=2)), format="beir")
    yield svc, pc
    svc.stop()


def test_customize_deploy_and_query_through_gateway(platform_e2e, tiny_bert_dir):
    from openai import OpenAI
    from sentence_transformers import SentenceTransformer

    svc, pc = platform_e2e
    job = pc.create_customization_job(
        model="tiny", dataset={"training": "train", "validation": "val"},
        training={"finetuning_type": "all_weights", "max_seq_length": 64},
        schedule={"epochs": 2}, batch={"global_batch_size": 8}, optimizer={"learning_rate": 1e-4},
        output={"name": "tiny-ft"},
        recipe={"eval": {"bm25": False, "matryoshka_sweep": False}, "finetune": {"validation_fraction": 0}},
    )
    assert job["stages"] == ["finetune", "eval"]
    done = pc.wait_job(job["id"], timeout=600, poll=0.5)
    assert done["status"] == "completed", (done["error"], pc.job_logs(job["id"], tail=40))
    details = done["status_details"]
    assert details["stages_completed"] == ["finetune", "eval"] and details["epochs_completed"] == 2
    losses = details["metrics"]["train_loss"]
    assert losses and all(np.isfinite(p["value"]) for p in losses) and losses[-1]["step"] == details["step"]

    model = pc.get_model("tiny-ft")  # registered automatically, with lineage
    assert model["kind"] == "customized" and model["base_model"] == "tiny" and model["dataset"] == "train"
    assert model["job_id"] == job["id"]
    assert model["hyperparameters"]["epochs"] == 2 and model["hyperparameters"]["learning_rate"] == 1e-4
    assert model["hyperparameters"]["global_batch_size"] == 8
    stage_ndcg = model["metrics"]["finetuned"]["ndcg@10"]
    assert stage_ndcg == pytest.approx(ndcg_at_10(model["path"], passages(seed=2)), abs=1e-4)

    # The job's release gate: a fine-tune that did not beat the base model beyond the noise is not deployed
    # unless asked for by name (force); one that did is deployed as it is.
    release = model["metrics"]["release"]
    assert release["challenger"] in ("finetuned", "finetuned_hybrid") and release["query_set"]
    if release["model"] != "finetuned":
        with pytest.raises(PlatformAPIError) as gated:
            pc.create_deployment("tiny-ft", name="ft-dep")
        assert gated.value.status == 409 and gated.value.error["code"] == "release_gate"
        assert release["line"] in gated.value.error["message"]
    dep = pc.create_deployment("tiny-ft", name="ft-dep", force=release["model"] != "finetuned")
    assert dep["status"] == "pending"
    dep = pc.wait_deployment("ft-dep", timeout=300)
    assert dep["status"] == "ready", dep["error"]

    texts = ["wind in the sails", "butter and flour for the dough"]
    client = OpenAI(base_url=pc.gateway_url(model="tiny-ft"), api_key=pc.api_key)  # the platform key
    got = client.embeddings.create(model="tiny-ft", input=texts)  # base64 on the wire, decoded by openai
    vectors = np.array([d.embedding for d in got.data], dtype=np.float32)
    local = SentenceTransformer(model["path"], device="cpu").encode(texts, normalize_embeddings=True)
    assert vectors.shape == (2, 32)
    np.testing.assert_allclose(vectors, local, atol=1e-4)  # the gateway serves exactly the fine-tuned model
    by_provider = pc.openai(deployment="ft-dep")
    with pytest.raises(Exception) as denied:  # noqa: PT011 (the gateway wants the platform key too)
        OpenAI(base_url=pc.gateway_url(deployment="ft-dep"), api_key="unused").embeddings.create(
            model="tiny-ft", input=texts[:1])
    assert getattr(denied.value, "status_code", None) == 401
    again = by_provider.embeddings.create(model="tiny-ft", input=texts[:1], encoding_format="float")
    np.testing.assert_allclose(again.data[0].embedding, vectors[0], atol=1e-5)
    # The deployment's own loopback server wants the deployment's key, which only the platform holds:
    # neither a key-less local caller nor one holding the platform key gets past it.
    for headers in ({}, {"Authorization": f"Bearer {pc.api_key}"}):
        direct = httpx.post(f"{dep['url']}/v1/embeddings", json={"model": "tiny-ft", "input": "x"}, headers=headers)
        assert direct.status_code == 401, direct.text

    ev = pc.create_evaluation_job(deployment="ft-dep", dataset="val", k_values=[1, 5, 10])
    ev = pc.wait_job(ev["id"], kind="evaluation", timeout=300, poll=0.5)
    assert ev["status"] == "completed", ev["error"]
    served = ev["result"]["metrics"]["ndcg@10"]
    assert served == pytest.approx(stage_ndcg, abs=0.02)  # what is served scores what the eval stage measured
    assert ev["result"]["metrics_nvidia"]["ndcg_cut_10"] == served

    gone = pc.delete_deployment("ft-dep")
    assert gone["status"] == "deleted"
    wait_for(lambda: not pid_alive(dep["pid"]), timeout=15, what="serving process gone")
    with pytest.raises(Exception) as err:  # noqa: PT011
        client.embeddings.create(model="tiny-ft", input=texts)
    assert getattr(err.value, "status_code", None) == 404


@pytest.mark.slow  # one more worker importing torch; cancel of a running worker is also in test_platform_jobs
def test_cancel_mid_training_stops_the_worker(platform_e2e):
    _, pc = platform_e2e
    job = pc.create_customization_job(model="tiny", dataset="train", stages=["finetune"],
                                      hyperparameters={"epochs": 200, "batch_size": 4},
                                      recipe={"finetune": {"validation_fraction": 0}})
    training = wait_for(lambda: (j := pc.get_job(job["id"]))["status_details"].get("step", 0) >= 2 and j,
                        timeout=300, poll=0.2, what="training under way")
    assert training["status_details"]["max_steps"] > 100  # far from done: this cancel lands mid-training
    pc.cancel_job(job["id"])
    final = pc.wait_job(job["id"], timeout=60, poll=0.2)
    assert final["status"] == "cancelled" and final["output_model"] is None
    assert final["status_details"]["step"] < final["status_details"]["max_steps"]
    wait_for(lambda: not pid_alive(training["worker"]["pid"]), timeout=15, what="worker gone")
    with pytest.raises(Exception, match="not found"):  # noqa: PT011 (no half-trained model is registered)
        pc.get_model(f"tiny-{job['id'].split('-')[1][:8]}")


@pytest.mark.slow
def test_from_raw_documents_with_local_sdg(platform_e2e, tmp_path):
    """corpus -> sdg (shipped SmolLM2) -> prep -> finetune -> eval, all from an uploaded folder (~8 min here)."""
    from _platform_process import write_corpus

    _, pc = platform_e2e
    pc.upload_dataset("docs", write_corpus(tmp_path / "docs", n_docs=24))
    job = pc.create_customization_job(
        model="tiny", dataset="docs", hyperparameters={"epochs": 1, "batch_size": 8},
        recipe={"sdg": {"generator": "local", "max_chunks": 16, "queries_per_chunk": 1},
                "eval": {"bm25": False, "matryoshka_sweep": False}})
    assert job["stages"] == ["corpus", "sdg", "prep", "finetune", "eval"]
    done = pc.wait_job(job["id"], timeout=1800, poll=1)
    assert done["status"] == "completed", (done["error"], pc.job_logs(job["id"], tail=40))
    assert done["result"]["stages"]["sdg"]["counts"]
    assert pc.get_model(done["output_model"])["metrics"]["finetuned"]["ndcg@10"] >= 0
