"""``POST /v1/search`` on a real server over a real Milvus Lite index: results, auth, errors, mismatches."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from conftest import make_documents
from embedtune.artifacts import RunDir
from embedtune.config import load_recipe
from embedtune.corpus import run_corpus
from embedtune.deploy import run_deploy
from embedtune.serve.app import create_app
from embedtune.serve.loading import model_entry
from embedtune.serve.runner import start_in_thread

RARE = "zyxqvw"
KEY = "test-key-123"


@pytest.fixture(scope="module")
def indexed_run(tmp_path_factory, tiny_bert_dir):
    """A run whose fine-tuned model (the tiny model) filled its index; BM25 weight 0.7 so that a term
    found in one chunk only outranks the random model's dense scores."""
    root = tmp_path_factory.mktemp("search")
    docs = make_documents(n_per_topic=2)
    docs[5]["text"] += f" The {RARE} protocol was named after its inventor."
    (root / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    run = RunDir(root / "run")
    shutil.copytree(tiny_bert_dir, run.path("finetune", "model"))
    recipe = load_recipe(None, [f"corpus.path={root / 'docs.jsonl'}", f"model.name={tiny_bert_dir}",
                                "index.bm25_weight=0.7"])
    run_corpus(recipe, run)
    run_deploy(recipe, run)
    return run, docs[5]["_id"]


@pytest.fixture(scope="module")
def server(indexed_run, tiny_bert_dir):
    run, _ = indexed_run
    entries = [model_entry(f"m={run.root}"), model_entry(f"plain={tiny_bert_dir}")]
    with start_in_thread(create_app(entries, api_key=KEY)) as srv:
        srv.wait_ready()
        yield srv


def _post(srv, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{srv.url}/v1/search", json=body, headers=headers, timeout=60)


def test_hybrid_search_returns_ranked_chunks_with_the_lexical_match_first(server, indexed_run):
    _, rare_doc = indexed_run
    resp = _post(server, {"model": "m", "query": f"what is the {RARE} protocol", "top_k": 3})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "list" and body["model"] == "m" and body["mode"] == "hybrid"
    assert [h["rank"] for h in body["data"]] == [1, 2, 3]
    assert body["data"][0]["doc_id"] == rare_doc and RARE in body["data"][0]["text"]
    scores = [h["score"] for h in body["data"]]
    assert scores == sorted(scores, reverse=True)
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


@pytest.mark.parametrize("mode", ["dense", "bm25"])
def test_single_modes(server, indexed_run, mode):
    _, rare_doc = indexed_run
    resp = _post(server, {"model": "m", "query": f"{RARE} protocol", "top_k": 2, "mode": mode})
    assert resp.status_code == 200, resp.text
    data = resp.json()["data"]
    assert len(data) == (1 if mode == "bm25" else 2)  # BM25 retrieves only chunks sharing a term
    if mode == "bm25":
        assert data[0]["doc_id"] == rare_doc


def test_search_needs_the_key(server):
    for key in (None, "wrong"):
        resp = _post(server, {"model": "m", "query": "tides"}, key=key)
        assert resp.status_code == 401
        assert resp.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("body, status, param", [
    ({"model": "m", "query": "x", "mode": "fuzzy"}, 422, "mode"),
    ({"model": "m", "query": "x", "top_k": 0}, 422, "top_k"),
    ({"model": "m", "query": "x", "top_k": 100000}, 422, "top_k"),
    ({"model": "m", "query": ""}, 422, "query"),
    ({"model": "m", "query": "x", "topk": 3}, 422, None),
    ({"model": "m", "query": "x", "dimensions": 16}, 400, "dimensions"),
    ({"model": "nope", "query": "x"}, 404, "model"),
    ({"model": "plain", "query": "x"}, 404, "model"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, status, param):
    resp = _post(server, body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if param:
        assert error["param"] == param


def test_a_server_with_another_model_refuses_to_search_the_index(indexed_run):
    run, _ = indexed_run
    # The base model's own folder is not the fine-tuned model that filled the index.
    with start_in_thread(create_app([model_entry("default", index=run.root)])) as srv:
        srv.wait_ready()
        resp = httpx.post(f"{srv.url}/v1/search", json={"query": "tides"}, timeout=60)
    assert resp.status_code == 503
    assert "rerun `embedtune deploy`" in resp.json()["error"]["message"]
