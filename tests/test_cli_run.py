"""`embedtune run` as a CLI process through every stage (corpus -> sdg -> prep -> finetune -> eval -> export)
on 12 small documents with the tiny model; sdg asks an OpenAI-compatible chat server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import make_documents
from embedtune.artifacts import RunDir, read_json, read_jsonl
from embedtune.pipeline import STAGE_NAMES

ROOT = Path(__file__).resolve().parents[1]


class QuestionServer:
    """/v1/chat/completions writing two search questions per segment from its own words; the judge gives 9."""

    def __init__(self):
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                       "role": "assistant", "content": outer.answer(body)}}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.base_url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @staticmethod
    def answer(body: dict) -> str:
        prompt = body["messages"][-1]["content"]
        if "extract the artifacts" in prompt:
            return '{"key_concepts": ["topic"]}'
        if "question-answer pairs" not in prompt:  # the judge
            return '{"relevance": 9, "accuracy": 9, "context_support": 9, "clarity": 9, "overall": 9}'
        pairs = []
        for label, text in re.findall(r"\[(S\d+)\] (.{1,300})", prompt, re.S):
            words = [w.strip(".,").lower() for w in text.split() if w.strip(".,").isalpha()][:24]
            for a, b in ((1, len(words) // 2), (3, len(words) - 2)):
                pairs.append({"question": f"what links {words[a]} with {words[b]} here?", "answer": "x",
                              "query_type": "contextual", "reasoning_type": "factual", "complexity": 3,
                              "hops": 1, "segment_ids": [label]})
        return json.dumps({"pairs": pairs})

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _embedtune_run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "embedtune", "run", *args], env=env, capture_output=True,
                          text=True, timeout=900)


@pytest.mark.slow  # two CLI processes, six stages: 28 s on a lightly loaded 2-core box, 71 s loaded
def test_embedtune_run_goes_through_every_stage_and_a_rerun_skips_them(tmp_path, tiny_bert_dir):
    docs = tmp_path / "docs"
    docs.mkdir()
    for doc in make_documents(n_per_topic=2):  # 12 documents, 6 topics
        (docs / f"{doc['_id']}.txt").write_text(f"{doc['title']}\n\n{doc['text']}\n")
    server = QuestionServer()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": str(tiny_bert_dir)},
        "sdg": {"generator": "llm", "queries_per_chunk": 2, "dedup_threshold": 1.0,
                "llm": {"base_url": server.base_url, "model": "loopback", "api_key_env": "RUN_TEST_LLM_KEY",
                        "concurrency": 2, "max_retries": 0}},
        "finetune": {"epochs": 1, "learning_rate": 5e-3, "validation_fraction": 0.0, "matryoshka_dims": None},
        "export": {"gpu_precisions": []},
    }))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "RUN_TEST_LLM_KEY": "sk-loop",
           "COLUMNS": "200"}
    run_dir = tmp_path / "run"
    try:
        first = _embedtune_run(["--corpus", str(docs), "-c", str(recipe), "-r", str(run_dir)], env)
        assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
        requests = server.requests
        again = _embedtune_run(["--corpus", str(docs), "-c", str(recipe), "-r", str(run_dir)], env)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert server.requests == requests  # nothing regenerated
    finally:
        server.close()

    run = RunDir(run_dir)
    manifests = {name: run.manifest(name) for name in STAGE_NAMES}
    assert all(manifests.values()), [n for n, m in manifests.items() if m is None]
    assert manifests["corpus"].counts["documents"] == 12
    chunks = list(read_jsonl(run.path("corpus", "chunks.jsonl")))
    assert len(chunks) == manifests["corpus"].counts["chunks"] >= 12
    queries = list(read_jsonl(run.path("sdg", "queries.jsonl")))
    assert len(queries) == manifests["sdg"].counts["kept"] == 2 * len(chunks)
    train = list(read_jsonl(run.path("prep", "train.jsonl")))
    held_out = list(read_jsonl(run.path("prep", "eval", "queries.jsonl")))
    assert len(train) + len(held_out) == len(queries) and train and held_out
    assert manifests["finetune"].counts["train_examples"] == len(train)
    results = read_json(run.path("eval", "results.json"))
    assert results["models"] == ["base", "finetuned"] and results["n_queries"] == len(held_out)
    assert manifests["eval"].metrics["finetuned_ndcg@10"] == results["finetuned"]["ndcg@10"]
    assert read_json(run.path("export", "embedtune.json"))["source"] == str(run.path("finetune", "model"))

    # The exported ONNX model encodes like the fine-tuned model, which is not the base model.
    from embedtune.export import OnnxEncoder
    from embedtune.models import encode_passages, load_model

    texts = [c["text"] for c in chunks[:4]]
    tuned = encode_passages(load_model(str(run.path("finetune", "model"))), texts)
    exported = OnnxEncoder(run.path("export"), "fp32").encode(texts, prompt_name="document")
    assert (tuned * exported).sum(1).min() >= 0.9999
    assert np.abs(tuned - encode_passages(load_model(str(tiny_bert_dir)), texts)).max() > 1e-4
    # The summary table: every stage done, then every stage skipped.
    assert _statuses(first.stdout + first.stderr) == dict.fromkeys(STAGE_NAMES, "done")
    assert _statuses(again.stdout + again.stderr) == dict.fromkeys(STAGE_NAMES, "skipped")


def _statuses(output: str) -> dict[str, str]:
    """stage -> status from the rows of the `embedtune run` summary table."""
    rows = [[cell.strip() for cell in line.split("│")[1:3]] for line in output.splitlines() if line.startswith("│")]
    return {row[0]: row[1] for row in rows if len(row) == 2 and row[0] in STAGE_NAMES}


@pytest.mark.parametrize("recipe_file", sorted((ROOT / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads_and_validates(recipe_file):
    """Each example in recipes/ is a valid recipe whose every key is used (an unknown key is an error)."""
    from embedtune.config import load_recipe

    raw = yaml.safe_load(recipe_file.read_text())
    recipe = load_recipe(recipe_file, [])
    dumped = recipe.model_dump(mode="json")
    for section, values in raw.items():  # what the file sets is what the recipe holds
        if isinstance(values, dict):
            for key, value in values.items():
                if not isinstance(value, dict):
                    assert dumped[section][key] == value, (section, key)
        else:
            assert dumped[section] == values, section


def test_recipes_folder_is_not_empty():  # an empty folder would turn the test above into a skip
    assert list((ROOT / "recipes").glob("*.yaml"))
