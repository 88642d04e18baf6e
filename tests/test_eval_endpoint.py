"""Endpoint mode against a real uvicorn server on 127.0.0.1 serving the tiny models (OpenAI shape)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import openai
import pytest
from typer.testing import CliRunner

from embedtune.evaluate import compare_within_tolerance, evaluate_endpoint, evaluate_model, load_beir
from embedtune.models import encode_passages, encode_queries, load_model
from test_eval_stage import _topical_beir, finetuned_dir, run_with_finetune  # noqa: F401  (fixtures)


def _embeddings_app(models: dict, fail_first: int = 0):
    """A minimal /v1/embeddings (NIM ``input_type``; float or base64 like the official client asks)."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()
    state = {"calls": 0, "input_types": set()}
    app.state.stats = state

    @app.get("/v1/models")
    def list_models():
        return {"object": "list", "data": [{"id": name, "object": "model"} for name in models]}

    @app.post("/v1/embeddings")
    def embeddings(body: dict):
        state["calls"] += 1
        if state["calls"] <= fail_first:  # a transient overload the client must retry through
            return JSONResponse({"error": {"message": "busy", "type": "overloaded", "param": None,
                                           "code": 503}}, status_code=503)
        model = models[body["model"]]
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        state["input_types"].add(body.get("input_type"))
        encode = encode_queries if body.get("input_type") == "query" else encode_passages
        emb = encode(model, texts)
        as_b64 = body.get("encoding_format") == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(e.astype("<f4").tobytes()).decode() if as_b64 else e.tolist()}
                for i, e in enumerate(emb)]
        return {"object": "list", "data": data, "model": body["model"],
                "usage": {"prompt_tokens": 0, "total_tokens": 0}}

    return app


@pytest.fixture(scope="module")
def server(tiny_bert_dir, finetuned_dir):  # noqa: F811
    import uvicorn

    app = _embeddings_app({"tiny": load_model(str(tiny_bert_dir)), "drifted": load_model(str(finetuned_dir))},
                          fail_first=1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", app.state.stats
    srv.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def dataset(tmp_path, topical_docs):
    return load_beir(_topical_beir(tmp_path / "ds", topical_docs))


def test_served_model_matches_local_figures(server, dataset, tiny_bert_dir):
    url, stats = server
    served = evaluate_endpoint(url, "tiny", dataset, batch_size=5, max_retries=3)
    local = evaluate_model(load_model(str(tiny_bert_dir)), dataset)
    assert served.metrics == pytest.approx(local, abs=1e-6)
    assert compare_within_tolerance(local, served.metrics) == []
    assert {"query", "passage"} <= stats["input_types"]
    assert stats["calls"] >= 1 + 5 + 5  # the refused first call was retried; 24 docs and queries in 5s


@pytest.fixture(scope="module")
def embedtune_serve():
    """`embedtune serve` as a process on loopback: the shipped default model, a key from an env var."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from embedtune.serve.runner import wait_ready

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "EVAL_SERVE_KEY": "eval-k3y",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "embedtune", "serve", "--model", "default", "--port", str(port),
                             "-o", "serve.api_key_env=EVAL_SERVE_KEY"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, 240, alive=lambda: proc.poll() is None)
        except RuntimeError:
            pytest.fail(proc.stdout.read() if proc.stdout else "server exited")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_embedtune_serve_matches_local_figures(embedtune_serve, dataset):
    """The client against the real server: the default model served (torch backend, the server's own
    batching and prompts) scores what the same model scores locally; without the key it is refused."""
    served = evaluate_endpoint(embedtune_serve, "default", dataset, api_key="eval-k3y", batch_size=7)
    local = evaluate_model(load_model("default"), dataset)
    assert served.metrics == pytest.approx(local, abs=1e-5)
    assert compare_within_tolerance(local, served.metrics) == []
    with pytest.raises(openai.AuthenticationError, match="401"):
        evaluate_endpoint(embedtune_serve, "default", dataset, api_key=None, max_retries=0)


def test_drifted_endpoint_fails_when_asked(server, tmp_path, topical_docs, tiny_bert_dir, monkeypatch):
    url, _ = server
    monkeypatch.setenv("EMBEDTUNE_CACHE_DIR", str(tmp_path / "cache"))
    root = _topical_beir(tmp_path / "ds", topical_docs)
    from embedtune.cli import app

    def run(name, *extra):
        args = ["eval", "--dataset", str(root), "--model", str(tiny_bert_dir), "--no-bm25",
                "--endpoint", url, "--endpoint-model", name, "--out", str(tmp_path / name), *extra]
        return CliRunner().invoke(app, args, catch_exceptions=False)

    same = run("tiny", "--fail-on-drift")
    assert same.exit_code == 0, same.output
    assert json.loads((tmp_path / "tiny" / "results.json").read_text())["endpoint"]["violations"] == []

    drifted = run("drifted")  # reported, but not fatal unless asked
    assert drifted.exit_code == 0, drifted.output
    violations = json.loads((tmp_path / "drifted" / "results.json").read_text())["endpoint"]["violations"]
    assert violations and all(abs(v["diff"]) > v["tolerance"] for v in violations)
    assert "drift" in (tmp_path / "drifted" / "report.md").read_text()
    assert run("drifted", "--fail-on-drift").exit_code == 3


def test_endpoint_checked_against_a_runs_finetuned_model(server, run_with_finetune, tiny_bert_dir):  # noqa: F811
    from embedtune.artifacts import read_json
    from embedtune.cli import app

    url, _ = server
    run = run_with_finetune
    args = ["eval", "-r", str(run.root), "-o", f"model.name={tiny_bert_dir}", "--no-bm25", "--endpoint", url,
            "--fail-on-drift"]
    # The server's "drifted" model is the run's fine-tuned model: the reference the check picks.
    res = CliRunner().invoke(app, [*args, "--endpoint-model", "drifted"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = read_json(run.path("eval", "endpoint.json"))
    assert (report["reference"], report["violations"]) == ("finetuned", [])
    assert read_json(run.path("eval", "results.json"))["finetuned"]["ndcg@10"] == pytest.approx(
        report["metrics"]["ndcg@10"], abs=1e-6)
    # Serving the base model instead of the fine-tuned one is caught.
    res = CliRunner().invoke(app, [*args, "--endpoint-model", "tiny"], catch_exceptions=False)
    assert res.exit_code == 3 and read_json(run.path("eval", "endpoint.json"))["violations"]


def test_endpoint_rejects_a_short_answer(tmp_path):
    from embedtune.retrieval.encoders import EndpointEncoder

    class OneShort:
        class embeddings:  # noqa: N801 - mimics the client's attribute
            @staticmethod
            def create(**kw):
                from types import SimpleNamespace

                return SimpleNamespace(data=[SimpleNamespace(index=0, embedding=[1.0, 0.0])])

    enc = EndpointEncoder("http://127.0.0.1:9", "m")
    enc.client = OneShort()
    with pytest.raises(ValueError, match="asked for 2 embeddings, got 1"):
        enc.encode(["a", "b"], "query")
