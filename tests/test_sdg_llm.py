"""The `llm` generator end to end against a real HTTP server on 127.0.0.1 that speaks
/v1/chat/completions and returns scripted answers (malformed JSON, 429, 500, a slow answer, low scores)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from embedtune.artifacts import RunDir, write_jsonl
from embedtune.config import load_recipe
from embedtune.schemas import Chunk, SyntheticQuery, read_rows
from embedtune.sdg import SdgError, run_sdg

CHUNKS = [
    Chunk(_id="sail#0", doc_id="sail", title="Sailing", start=0,
          text="Sailors trim the mainsail and use the rudder to hold a course when the wind rises."),
    Chunk(_id="sail#1", doc_id="sail", title="Sailing", start=100,
          text="At anchor the crew checks the tide tables so the keel stays clear of the harbour floor."),
    Chunk(_id="bake#0", doc_id="bake", title="Baking", start=0,
          text="Bread dough rises in a warm kitchen for an hour before it is shaped and baked."
               " MARK_MALFORMED"),
    Chunk(_id="stars#0", doc_id="stars", title="Astronomy", start=0,
          text="A small telescope shows the moons of Jupiter and the rings of Saturn on clear nights."
               " MARK_429"),
    Chunk(_id="bank#0", doc_id="bank", title="Finance", start=0,
          text="Central banks raise interest rates to slow inflation when prices climb too quickly."
               " MARK_500"),
    Chunk(_id="med#0", doc_id="med", title="Medicine", start=0,
          text="Doctors adjust the dosage of a vaccine for children according to their age and weight."
               " MARK_SLOW"),
    Chunk(_id="cpu#0", doc_id="cpu", title="Computing", start=0,
          text="Compilers turn source code into machine instructions that processors execute."
               " MARK_GARBAGE"),
]

# Per chunk: a good question, its near-duplicate (one word more) and a weak one the judge scores low.
WEAK = {
    "sail#0": "Weak: is wind a thing",
    "sail#1": "Weak: do harbours have floors",
    "bake#0": "Weak: what colour is a kitchen",
    "stars#0": "Weak: are nights sometimes clear",
    "bank#0": "Weak: do prices exist",
    "med#0": "Weak: are children people",
    "cpu#0": "Weak: is code long",
}
QUESTIONS = {
    "sail#0": "How do sailors keep their heading when the breeze gets stronger?",
    "sail#1": "Why does a crew at anchor look up when the water will be low?",
    "bake#0": "How long should bread dough rest in a warm room before baking?",
    "stars#0": "Which planets' moons and rings can an amateur observer see?",
    "bank#0": "Why do central banks increase borrowing costs during inflation?",
    "med#0": "How is the amount of a vaccine given to a child decided?",
    "cpu#0": "What converts programs into instructions a chip can run?",
}


class ScriptedLLM:
    """A chat-completions server whose answers depend on markers in the prompt."""

    def __init__(self, slow_seconds: float = 1.5):
        self.requests: list[dict] = []
        self.seen: Counter[str] = Counter()
        self.slow_seconds = slow_seconds
        self.status_override: int | None = None  # e.g. 401 for every request
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload, delay = outer.answer(body, self.headers.get("Authorization", ""))
                time.sleep(delay)
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    if status == 429:
                        self.send_header("retry-after-ms", "10")
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def count(self, kind: str | None = None) -> int:
        return sum(1 for r in self.requests if kind is None or r["kind"] == kind)

    # ------------------------------------------------------------------------------------ scripting

    def answer(self, body: dict, auth: str) -> tuple[int, dict, float]:
        prompt = body["messages"][-1]["content"]
        kind = ("artifacts" if "extract the artifacts" in prompt else
                "questions" if "question-answer pairs" in prompt else "judge")
        digest = _digest(body)
        with self.lock:
            self.seen[digest] += 1
            nth = self.seen[digest]
            self.requests.append({"kind": kind, "nth": nth, "auth": auth, "body": body})
        if self.status_override:
            return self.status_override, _error(self.status_override), 0.0
        if kind == "questions" and "MARK_429" in prompt and nth == 1:
            return 429, _error(429), 0.0
        if kind == "questions" and "MARK_500" in prompt and nth == 1:
            return 500, _error(500), 0.0
        delay = self.slow_seconds if kind == "questions" and "MARK_SLOW" in prompt and nth == 1 else 0.0
        if kind == "artifacts":
            return 200, _completion('{"key_concepts": ["x"], "entities": ["y"]}'), delay
        if kind == "judge":
            question = prompt.split("Question: ", 1)[1].split("\n", 1)[0]
            overall = 4 if question.startswith("Weak") else 9
            text = f'```json\n{{"relevance": 9, "accuracy": 8, "context_support": 9, "clarity": 8, ' \
                   f'"overall": {overall}, "reason": "ok"}}\n```'
            return 200, _completion(text), delay
        if "MARK_GARBAGE" in prompt or ("MARK_MALFORMED" in prompt and nth == 1):
            return 200, _completion("Sure! Here are your questions: {pairs: [oops"), delay
        return 200, _completion(self.questions(prompt)), delay

    def questions(self, prompt: str) -> str:
        labels = re.findall(r"\[(S\d+)\] ", prompt)
        texts = re.findall(r"\[S\d+\] (.*)", prompt)
        ids = [next(c.id for c in CHUNKS if c.text[:40] in t) for t in texts]
        if len(labels) > 1:
            pairs = [{"question": "Which checks keep a boat safe both under sail and at anchor?",
                      "answer": "rudder and tides", "query_type": "multi_hop", "reasoning_type": "relational",
                      "complexity": 9, "hops": 2, "segment_ids": labels}]
        else:
            good = QUESTIONS[ids[0]]
            pairs = [
                {"question": good, "answer": "a", "query_type": "contextual", "reasoning_type": "factual",
                 "complexity": 3, "hops": 1, "segment_ids": ["S1"]},
                {"question": good.replace("?", " exactly?"), "answer": "a", "query_type": "contextual",
                 "reasoning_type": "factual", "complexity": 3, "hops": 1, "segment_ids": ["S1"]},
                {"question": WEAK[ids[0]], "answer": "b", "query_type": "structural",
                 "reasoning_type": "causal", "complexity": 1, "hops": 1, "segment_ids": ["S1"]},
            ]
        # Answer in a fence with prose around it, as chat models often do.
        return "Here you go:\n```json\n" + json.dumps({"pairs": pairs}) + "\n```"


def _digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _completion(text: str) -> dict:
    return {"id": "x", "object": "chat.completion", "created": 0, "model": "scripted",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def _error(status: int) -> dict:
    return {"error": {"message": f"scripted {status}", "type": "error", "param": None, "code": status}}


# ---------------------------------------------------------------------------------------------- setup


def make_run(tmp_path: Path, chunks=CHUNKS) -> RunDir:
    run = RunDir(tmp_path / "run")
    path = run.path("corpus", "chunks.jsonl")
    write_jsonl(path, chunks)
    run.stage("corpus", {"test": True}).finish(outputs=[path])
    return run


def recipe_for(server: ScriptedLLM, model_dir: Path, **extra: str):
    overrides = [
        "sdg.generator=llm", f"sdg.llm.base_url={server.base_url}", "sdg.llm.model=scripted",
        "sdg.llm.api_key_env=SDG_TEST_KEY", "sdg.llm.timeout=0.5", "sdg.llm.max_retries=2",
        "sdg.llm.concurrency=4", "sdg.queries_per_chunk=3", f"model.name={model_dir}",
        *(f"{k}={v}" for k, v in extra.items()),
    ]
    return load_recipe(None, overrides)


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv("SDG_TEST_KEY", "sk-test-secret-123")


# ---------------------------------------------------------------------------------------------- tests


def test_llm_end_to_end_retries_parses_judges_dedups_and_caches(tmp_path, default_model_dir):
    run = make_run(tmp_path)
    with ScriptedLLM() as server:
        recipe = recipe_for(server, default_model_dir)
        manifest = run_sdg(recipe, run)
        rows = {q.text: q for q in read_rows(run.path("sdg", "queries.jsonl"), SyntheticQuery)}

        # 429, 500 and the timed-out slow answer were retried by the client and then succeeded.
        assert all(QUESTIONS[c] in rows for c in ("stars#0", "bank#0", "med#0"))
        # The malformed answer was asked again and parsed the second time.
        assert QUESTIONS["bake#0"] in rows
        # The always-garbage chunk is counted as rejected, not fatal.
        assert QUESTIONS["cpu#0"] not in rows
        assert manifest.counts["rejected"]["unparseable"] == 1
        assert manifest.counts["generator"]["unparseable_questions_responses"] >= 3 + 1
        # Judge: the weak questions scored 4 < 7 were dropped; kept ones carry their scores.
        assert not any(t.startswith("Weak") for t in rows)
        assert manifest.counts["rejected"]["judge_low_score"] == 6
        assert all(q.scores.overall == 9 and q.scores.relevance == 9 for q in rows.values())
        # Near duplicates ("... exactly?") removed by embedding cosine >= 0.9.
        assert manifest.counts["rejected"]["near_duplicate"] == 6
        assert not any("exactly" in t for t in rows)
        # Multi-hop bundle of the two sailing chunks cites both.
        multi = [q for q in rows.values() if q.query_type == "multi_hop"]
        assert len(multi) == 1 and multi[0].positive_ids == ["sail#0", "sail#1"] and multi[0].hops == 2
        assert multi[0].complexity == 5  # clipped into the configured range
        assert {q.generator.kind for q in rows.values()} == {"llm"}
        assert manifest.counts["kept"] == len(rows) == 7  # 6 good single-hop + 1 multi-hop
        # The key is sent to the server but never written to the run directory.
        assert server.requests[0]["auth"] == "Bearer sk-test-secret-123"
        for f in run.root.rglob("*"):
            if f.is_file() and f.suffix != ".sqlite":
                assert b"sk-test-secret" not in f.read_bytes(), f

        # A forced rerun is served entirely from the cache: no new request reaches the server.
        before = server.count()
        again = run_sdg(recipe, run, force=True)
        assert server.count() == before
        assert again.counts["kept"] == manifest.counts["kept"]
        assert again.counts["cache_hits"] > 0


def test_unreachable_endpoint_and_bad_key_fail_clearly_and_resume(tmp_path, tiny_bert_dir):
    run = make_run(tmp_path, CHUNKS[:2])
    with ScriptedLLM() as server:
        recipe = recipe_for(server, tiny_bert_dir,
                            **{"sdg.dedup_threshold": "1.0", "sdg.llm.concurrency": "1"})
        server.status_override = 401
        with pytest.raises(SdgError, match=r"rejected the API key from \$SDG_TEST_KEY") as err:
            run_sdg(recipe, run)
        assert "sk-test-secret" not in str(err.value)
        assert run.manifest("sdg") is None

        # Interrupted run: the server fails after four answers; those stay cached.
        server.status_override = None
        original = server.answer
        answered: list[str] = []

        def flaky(body, auth):
            if len(answered) >= 4:
                return 503, _error(503), 0.0
            answered.append(_digest(body))
            return original(body, auth)

        server.answer = flaky
        with pytest.raises(SdgError, match="rerun to resume"):
            run_sdg(recipe, run)
        assert run.manifest("sdg") is None and len(answered) == 4
        server.answer = original
        n_before = server.count()

        manifest = run_sdg(recipe, run)
        resumed = [_digest(r["body"]) for r in server.requests[n_before:]]
        # The resumed run asked only for what the interrupted one had not received, and took the four
        # answers it had from the cache.
        assert resumed and not set(resumed) & set(answered)
        assert manifest.counts["cache_hits"] == len(answered) == 4

        # What it wrote is what an uninterrupted run writes (a fresh run directory, its own cache).
        fresh = make_run(tmp_path / "fresh", CHUNKS[:2])
        reference = run_sdg(recipe, fresh)
        assert reference.counts["cache_hits"] == 0
        assert manifest.counts["kept"] == reference.counts["kept"] == 5  # 2 good + 2 rephrased + 1 multi-hop
        assert run.path("sdg", "queries.jsonl").read_bytes() == fresh.path("sdg", "queries.jsonl").read_bytes()


def test_unreachable_host_is_a_clear_error(tmp_path, tiny_bert_dir):
    run = make_run(tmp_path, CHUNKS[:1])
    recipe = load_recipe(None, ["sdg.generator=llm", "sdg.llm.base_url=http://127.0.0.1:9/v1",
                                "sdg.llm.max_retries=0", "sdg.llm.timeout=2", f"model.name={tiny_bert_dir}"])
    with pytest.raises(SdgError, match="127.0.0.1:9.*rerun to resume"):
        run_sdg(recipe, run)


# ------------------------------------------------------------------- response_format and 400 / 404


class JsonModeLLM(ScriptedLLM):
    """The scripted server, plus what real servers do with ``response_format={"type": "json_object"}``:
    ``honour`` answers bare JSON when asked for it (prose with a fenced block otherwise); ``reject`` answers
    400 naming response_format, as servers without JSON mode do. MARK_TOO_LONG in a prompt gets a 400 for
    another reason (a context-length error), and ``not_found`` answers 404 to everything."""

    def __init__(self, mode: str = "honour", not_found: bool = False):
        super().__init__()
        self.mode, self.not_found = mode, not_found

    def answer(self, body: dict, auth: str) -> tuple[int, dict, float]:
        wants_json = body.get("response_format") == {"type": "json_object"}
        prompt = body["messages"][-1]["content"]
        refusal = None
        if self.not_found:
            refusal = 404, {"error": {"message": f"The model `{body['model']}` does not exist.",
                                      "type": "NotFoundError", "param": None, "code": 404}}
        elif wants_json and self.mode == "reject":
            refusal = 400, {"error": {"message": "response_format is not supported by this server",
                                      "type": "invalid_request_error", "param": "response_format", "code": None}}
        elif "MARK_TOO_LONG" in prompt and "question-answer pairs" in prompt:
            refusal = 400, {"error": {"message": "This model's maximum context length is 512 tokens",
                                      "type": "invalid_request_error", "param": "messages", "code": None}}
        if refusal is not None:
            with self.lock:
                self.requests.append({"kind": "refused", "nth": 0, "auth": auth, "body": body})
            return refusal[0], refusal[1], 0.0
        status, payload, delay = super().answer(body, auth)
        if status == 200 and wants_json and self.mode == "honour":
            message = payload["choices"][0]["message"]
            fenced = re.search(r"```json\n(.*?)\n```", message["content"], re.S)
            message["content"] = fenced.group(1) if fenced else message["content"]
            json.loads(message["content"])  # what JSON mode promises: the whole answer is one JSON value
        return status, payload, delay


def _json_mode_recipe(server, model_dir):
    return recipe_for(server, model_dir, **{"sdg.dedup_threshold": "1.0", "sdg.llm.concurrency": "1"})


def test_json_mode_is_requested_and_bare_json_answers_are_parsed(tmp_path, tiny_bert_dir):
    run = make_run(tmp_path, CHUNKS[:2])
    with JsonModeLLM("honour") as server:
        manifest = run_sdg(_json_mode_recipe(server, tiny_bert_dir), run)
    assert server.requests and all(r["body"]["response_format"] == {"type": "json_object"}
                                   for r in server.requests)
    assert manifest.counts["kept"] == 5
    assert not any(k.startswith("unparseable") for k in manifest.counts["generator"])


def test_server_without_json_mode_falls_back_to_plain_text_once(tmp_path, tiny_bert_dir, caplog):
    run = make_run(tmp_path, CHUNKS[:2])
    with JsonModeLLM("reject") as server:
        manifest = run_sdg(_json_mode_recipe(server, tiny_bert_dir), run)
    refused = [r for r in server.requests if r["kind"] == "refused"]
    answered = [r for r in server.requests if r["kind"] != "refused"]
    assert len(refused) == 1 and "response_format" in refused[0]["body"]  # asked once, then never again
    assert answered and not any("response_format" in r["body"] for r in answered)
    # The refused request was sent again as plain text, so nothing was lost.
    assert manifest.counts["kept"] == 5
    assert not any(k.startswith("failed_") for k in manifest.counts["generator"])
    assert "does not support response_format=json_object" in caplog.text


def test_a_400_for_another_reason_skips_that_request_only(tmp_path, tiny_bert_dir):
    too_long = Chunk(_id="long#0", doc_id="long", title="Long", start=0,
                     text="A passage the server finds too long for its context window. MARK_TOO_LONG")
    run = make_run(tmp_path, [*CHUNKS[:2], too_long])
    with JsonModeLLM("honour") as server:
        manifest = run_sdg(_json_mode_recipe(server, tiny_bert_dir), run)
    assert manifest.counts["generator"]["failed_questions_requests"] == 1
    assert manifest.counts["rejected"]["unparseable"] == 1  # the unit that got no answer
    assert manifest.counts["kept"] == 5  # the sailing chunks are unaffected
    after = server.requests[[r["kind"] for r in server.requests].index("refused") + 1:]
    assert after and all("response_format" in r["body"] for r in after)  # not mistaken for "no JSON mode"


def test_404_names_the_model_and_the_settings_to_check(tmp_path, tiny_bert_dir):
    run = make_run(tmp_path, CHUNKS[:1])
    with JsonModeLLM(not_found=True) as server, pytest.raises(SdgError) as err:
        run_sdg(_json_mode_recipe(server, tiny_bert_dir), run)
    message = str(err.value)
    assert "model 'scripted'" in message and "404" in message
    assert "sdg.llm.base_url" in message and "sdg.llm.model" in message
    assert len(server.requests) == 1  # not retried: a wrong model name does not fix itself
    assert run.manifest("sdg") is None


def test_example_queries_steer_the_question_prompt_and_are_recorded(tmp_path, tiny_bert_dir):
    examples = tmp_path / "examples.jsonl"
    rows = [{"query": "Tidal harbours silt up within a decade.", "passage": "Harbours..."},
            {"query": "Vaccine doses scale with body weight.", "doc_id": "sail"}]
    examples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = make_run(tmp_path, CHUNKS[:2])
    with JsonModeLLM("honour") as server:
        run_sdg(recipe_for(server, tiny_bert_dir, **{"sdg.examples": str(examples), "sdg.llm.concurrency": "1"}), run)
    questions = [r["body"]["messages"][-1]["content"] for r in server.requests
                 if "question-answer pairs" in r["body"]["messages"][-1]["content"]]
    assert questions and all("Tidal harbours silt up within a decade." in p and "Vaccine doses scale" in p
                             and "style" in p for p in questions)
    record = json.loads(run.path("sdg", "examples.json").read_text())
    assert record["given"] == 2 and [e["query"] for e in record["used"]][0].startswith("Tidal")
    assert record["sha256"] == hashlib.sha256(examples.read_bytes()).hexdigest()
    # The doc_id row took the passage of that document's first chunk.
    assert record["used"][1]["passage"] == CHUNKS[0].text
