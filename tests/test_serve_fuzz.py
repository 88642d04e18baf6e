"""Schemathesis over the embeddings server's OpenAPI spec, against a real uvicorn on 127.0.0.1.

Every generated request (valid and invalid bodies, odd paths, wrong methods) must get no 5xx and a
response that conforms to the spec: documented status, documented content type, body matching its
schema (OpenAI's error shape for every 4xx/5xx). The number of examples per operation is bounded by
EMBEDTUNE_FUZZ_EXAMPLES (default 40: fast enough for every run; RELIABILITY.md lists larger runs).
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks as st_checks

from embedtune.config import ModelConfig, ServeConfig
from embedtune.models import load_model
from embedtune.serve import ModelEntry, TorchBackend, create_app, start_in_thread

KEY = "fuzz-key"
EXAMPLES = int(os.environ.get("EMBEDTUNE_FUZZ_EXAMPLES", "40"))
# Small limits, so generated bodies reach them: 64 KiB, 16 inputs, 300 tokens, the tiny model's 64 tokens.
CONFIG = ServeConfig(max_inputs=16, max_request_bytes=64 * 1024, max_queue=64, max_request_tokens=300)


@pytest.fixture(scope="module")
def server(tiny_bert_dir):
    entry = ModelEntry("tiny", str(tiny_bert_dir), lambda: TorchBackend(
        load_model(ModelConfig(name=str(tiny_bert_dir), query_prompt="query: ", passage_prompt="passage: ")),
        matryoshka_dims=[8, 16]))
    with start_in_thread(create_app([entry], CONFIG, api_key=KEY)) as srv:
        srv.wait_ready()
        yield srv


# The spec does not depend on the model, so it is taken from an app whose model is never loaded; the
# requests go to the real server above. (schemathesis.pytest.from_fixture fails on pytest 9.)
STATUSES: Counter[str] = Counter()  # "POST /v1/embeddings 422" -> count, for RELIABILITY.md


@pytest.fixture(scope="module", autouse=True)
def status_report():
    """With EMBEDTUNE_FUZZ_REPORT=path, write how many requests got which status."""
    yield
    if path := os.environ.get("EMBEDTUNE_FUZZ_REPORT"):
        with open(path, "w") as fh:
            json.dump({"total": sum(STATUSES.values()), "by_status": dict(sorted(STATUSES.items()))}, fh, indent=1)


schema = schemathesis.openapi.from_dict(create_app([ModelEntry("tiny", "", lambda: None)], CONFIG).openapi())

# positive_data_acceptance is left out: a body the schema allows may still be refused for what only the
# server knows (an unknown model name, a token id outside the vocabulary, more tokens than the model
# takes with truncate=NONE, a dimension the model lacks); those are documented 4xx, checked for shape.
EXCLUDED = [st_checks.positive_data_acceptance]


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_5xx_and_every_response_conforms(case, server):
    response = case.call_and_validate(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                      excluded_checks=EXCLUDED, timeout=60)
    STATUSES[f"{case.method} {case.path} {response.status_code}"] += 1
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
