"""The exfiltration scenario (issues 17 and 28) with a job that actually runs: a real `embedtune platform`
process whose environment holds secrets, an operator who allowed one LLM endpoint and one secret, and a
customization job (corpus -> sdg with the `llm` generator) that runs to completion in a worker process and
talks to that endpoint. What the endpoint receives is recorded: the allowed key, never the service's secrets.

Before it, every way of pointing the job elsewhere is refused up front (422, the recipe key named), and the
endpoint has heard nothing at that point.
"""

from __future__ import annotations

import io
import itertools
import json
import re
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from _platform_process import Service
from embedtune.platform.client import PlatformAPIError

SECRET = "s3cret-of-the-service"
ALLOWED = "allowed-llm-key"

DOCS = {
    "sailing.txt": "Sailors trim the mainsail and use the rudder to hold a course when the wind rises.",
    "baking.txt": "Bread dough rises in a warm kitchen for an hour before it is shaped and baked.",
    "stars.txt": "A small telescope shows the moons of Jupiter and the rings of Saturn on clear and moonless nights.",
    "banks.txt": "Central banks raise interest rates to slow inflation when consumer prices climb too quickly.",
}
QUESTIONS = itertools.cycle([
    "how do crews keep a steady heading in strong gusts",
    "how long should dough rest before it goes into the oven",
    "which planets show moons through an amateur instrument",
    "why would a central bank make borrowing more expensive",
    "what do you check before anchoring overnight",
    "why does bread need a warm place to prove",
])


class FakeLLM(ThreadingHTTPServer):
    """An OpenAI-compatible chat endpoint on 127.0.0.1 that answers sdg's three prompts and records requests."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802 (http.server API)
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                with outer.lock:
                    outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": raw})
                    text = outer.answer(json.loads(raw)["messages"][-1]["content"])
                data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": "scripted",
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": text}}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}/v1"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @staticmethod
    def answer(prompt: str) -> str:
        if "extract the artifacts" in prompt:
            return json.dumps({"key_concepts": ["topic"], "entities": ["thing"]})
        if "question-answer pairs" in prompt:
            labels = re.findall(r"\[(S\d+)\] ", prompt)
            return json.dumps({"pairs": [{"question": next(QUESTIONS), "answer": "see the text",
                                          "query_type": "contextual", "reasoning_type": "factual",
                                          "complexity": 3, "hops": 1, "segment_ids": labels[:1]}]})
        return json.dumps({"relevance": 9, "accuracy": 9, "context_support": 9, "clarity": 9, "overall": 9,
                           "reason": "fine"})


@pytest.fixture
def llm():
    server = FakeLLM()
    yield server
    server.shutdown()
    server.server_close()


def corpus_archive() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, text in DOCS.items():
            data = text.encode()
            info = tarfile.TarInfo(f"docs/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def refused(call, param: str) -> None:  # noqa: ANN001
    with pytest.raises(PlatformAPIError) as err:
        call()
    assert err.value.status == 422 and err.value.error["param"] == param, (err.value.status, err.value.error)


@pytest.mark.slow  # a real job through a worker: ~50 s on an idle 2-core machine, 150 s under load
def test_a_job_that_runs_through_the_worker_sends_only_the_allowed_key(tmp_path, monkeypatch, llm):
    monkeypatch.setenv("SERVICE_SECRET", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("LLM_KEY", ALLOWED)
    svc = Service(tmp_path / "data", "--allow-llm-url", llm.url, "--allow-secret", "LLM_KEY").start()
    try:
        pc = svc.client("default")
        archive = tmp_path / "docs.tar.gz"
        archive.write_bytes(corpus_archive())
        pc.upload_dataset("docs", archive)
        llm_cfg = {"base_url": llm.url, "api_key_env": "LLM_KEY", "model": "scripted", "max_retries": 0,
                   "timeout": 60, "concurrency": 2}

        def job(**recipe: object) -> dict:
            return pc.create_customization_job(model="default", dataset="docs", stages=["corpus", "sdg"],
                                               recipe=recipe)

        # every way out is refused before anything runs
        refused(lambda: job(sdg={"generator": "llm", "llm": {**llm_cfg, "api_key_env": "SERVICE_SECRET"}}),
                "recipe.sdg.llm.api_key_env")
        refused(lambda: job(sdg={"generator": "llm", "llm": {**llm_cfg, "base_url": "http://127.0.0.1:9/v1"}}),
                "recipe.sdg.llm.base_url")
        refused(lambda: job(eval={"split": "/etc/leak"}), "recipe.eval.split")
        refused(lambda: job(index={"token_env": "SERVICE_SECRET"}), "recipe.index.token_env")
        assert llm.requests == []

        # the job the operator allowed runs to completion in a worker
        created = job(sdg={"generator": "llm", "llm": llm_cfg, "queries_per_chunk": 1})
        done = pc.wait_job(created["id"], timeout=900, poll=1)
        assert done["status"] == "completed", (done["error"], pc.job_logs(created["id"], tail=40))
        assert done["status_details"]["stages_completed"] == ["corpus", "sdg"]
        queries = (svc.data_dir / "jobs" / created["id"] / "run" / "sdg" / "queries.jsonl").read_text()
        assert queries.strip(), "sdg wrote no query"

        # the endpoint heard the job, with the allowed key only; the secrets went nowhere
        assert llm.requests and {r["path"] for r in llm.requests} == {"/v1/chat/completions"}
        for r in llm.requests:
            headers = {k.lower(): v for k, v in r["headers"].items()}
            assert headers["authorization"] == f"Bearer {ALLOWED}"
            seen = json.dumps(r["headers"]) + r["body"].decode("utf-8", "replace")
            assert SECRET not in seen and "SERVICE_SECRET" not in seen
        assert SECRET not in pc.job_logs(created["id"]) and SECRET not in json.dumps(done)
        for path in (svc.data_dir / "jobs" / created["id"]).rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), path
    finally:
        svc.stop()
