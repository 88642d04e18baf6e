"""Many clients at once against a real server: coalesced batches, correct vectors, 429 past the queue."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from embedtune.config import ModelConfig, ServeConfig
from embedtune.models import encode_passages, encode_queries, load_model
from embedtune.serve import ModelEntry, TorchBackend, create_app, start_in_thread

PROMPTS = {"query_prompt": "query: ", "passage_prompt": "passage: "}


class SlowBackend(TorchBackend):
    """Each batch takes at least ``delay`` seconds, so concurrent requests pile up behind it."""

    delay = 0.3

    def embed_tokens(self, batch):
        time.sleep(self.delay)
        return super().embed_tokens(batch)


@pytest.fixture(scope="module")
def model_config(tiny_bert_dir):
    return ModelConfig(name=str(tiny_bert_dir), **PROMPTS)


def serve(model_config, **config):
    entry = ModelEntry("tiny", model_config.name, lambda: SlowBackend(load_model(model_config)))
    return start_in_thread(create_app([entry], ServeConfig(**config)))


async def fire(url: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        return await asyncio.gather(*(http.post("/v1/embeddings", json=b) for b in bodies))


def batch_histogram(url: str) -> tuple[float, float]:
    """(number of batches, inputs in them) from the Prometheus batch-size histogram."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)}
    samples = {s.name: s.value for s in families["embedtune_batch_size"].samples}
    return samples["embedtune_batch_size_count"], samples["embedtune_batch_size_sum"]


def test_concurrent_requests_coalesce_into_fewer_batches_with_correct_results(model_config):
    texts = [f"request {i} about {word} and harbour tides" for i, word in enumerate(
        ["boats", "ovens", "stars", "loans", "vaccines", "kernels"] * 4)]
    kinds = ["query" if i % 2 else "passage" for i in range(len(texts))]
    with serve(model_config, max_queue=64) as srv:
        srv.wait_ready()
        bodies = [{"model": "tiny", "input": t, "input_type": k, "encoding_format": "float"}
                  for t, k in zip(texts, kinds, strict=True)]
        responses = asyncio.run(fire(srv.url, bodies))
        n_batches, n_inputs = batch_histogram(srv.url)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    assert n_inputs == len(texts)
    assert n_batches <= len(texts) / 4  # 24 requests, a 0.3 s batch: they pile up and share batches
    reference = load_model(model_config)
    for response, text, kind in zip(responses, texts, kinds, strict=True):
        got = np.array(response.json()["data"][0]["embedding"], dtype=np.float32)
        expected = (encode_queries if kind == "query" else encode_passages)(reference, [text])[0]
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_full_queue_answers_429_in_openai_shape_and_serves_the_rest(model_config):
    with serve(model_config, max_queue=2) as srv:
        srv.wait_ready()
        responses = asyncio.run(fire(srv.url, [{"model": "tiny", "input": f"text {i}"} for i in range(10)]))
        queue_after = httpx.get(f"{srv.url}/metrics").text
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1 and set(statuses) == {200, 429}
    refused = next(r for r in responses if r.status_code == 429)
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and set(error) == {"message", "type", "param", "code"}
    assert 'embedtune_requests_total{endpoint="/v1/embeddings",status="429"}' in queue_after
    assert 'embedtune_queue_depth{model="tiny"} 0.0' in queue_after  # drained afterwards
