"""A real uvicorn server on 127.0.0.1, called with the official openai client and with raw HTTP."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

from embedtune.config import ModelConfig, ServeConfig
from embedtune.models import encode_passages, encode_queries, load_model
from embedtune.serve import ModelEntry, TorchBackend, create_app, start_in_thread

KEY = "sekret"
PROMPTS = {"query_prompt": "query: ", "passage_prompt": "passage: "}
CONFIG = ServeConfig(max_inputs=16, max_request_bytes=64 * 1024, max_queue=64, max_request_tokens=300)
TEXTS = ["The rudder steers the boat through the harbour.", "Bake the dough in a hot oven.", "stars"]
LONG = " ".join(["sailing boats and harbour tides"] * 40)  # far more than the tiny model's 64 tokens


def tiny(tiny_bert_dir, prompts: bool = True):
    return load_model(ModelConfig(name=str(tiny_bert_dir), **(PROMPTS if prompts else {})))


@pytest.fixture(scope="module")
def reference(tiny_bert_dir):
    return tiny(tiny_bert_dir)


@pytest.fixture(scope="module")
def server(tiny_bert_dir):
    entries = [
        ModelEntry("tiny", str(tiny_bert_dir),
                   lambda: TorchBackend(tiny(tiny_bert_dir), matryoshka_dims=[8, 16])),
        ModelEntry("plain", str(tiny_bert_dir), lambda: TorchBackend(tiny(tiny_bert_dir, prompts=False))),
    ]
    with start_in_thread(create_app(entries, CONFIG, api_key=KEY)) as srv:
        srv.wait_ready()
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


def post(server, body, key: str | None = KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server.url}/v1/embeddings", json=body, headers=headers, timeout=30, **kw)


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array([d["embedding"] for d in response.json()["data"]], dtype=np.float32)


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if code:
        assert body["error"]["code"] == code
    return body["error"]


# ----------------------------------------------------------------------------------- openai client


def test_openai_client_float_matches_local_passages(client, reference):
    result = client.embeddings.create(model="tiny", input=TEXTS, encoding_format="float")
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    assert result.model == "tiny" and [d.index for d in result.data] == [0, 1, 2]
    np.testing.assert_allclose(got, encode_passages(reference, TEXTS), atol=1e-5)


def test_openai_client_default_base64_matches_local_queries(client, reference):
    # No encoding_format: the client asks for base64 and decodes little-endian float32 itself.
    result = client.embeddings.create(model="tiny", input=TEXTS, extra_body={"input_type": "query"})
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    np.testing.assert_allclose(got, encode_queries(reference, TEXTS), atol=1e-5)
    assert not np.allclose(got, encode_passages(reference, TEXTS), atol=1e-3)  # the prompt mattered


def test_raw_base64_is_little_endian_float32(server, reference):
    response = post(server, {"model": "tiny", "input": TEXTS[0], "encoding_format": "base64",
                             "input_type": "passage"})
    raw = base64.b64decode(response.json()["data"][0]["embedding"])
    np.testing.assert_allclose(np.frombuffer(raw, dtype="<f4"), encode_passages(reference, TEXTS[:1])[0],
                               atol=1e-5)


def test_dimensions_truncate_then_renormalise(client, reference):
    result = client.embeddings.create(model="tiny", input=TEXTS, dimensions=16, encoding_format="float",
                                      extra_body={"input_type": "document"})
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    full = encode_passages(reference, TEXTS)[:, :16]
    np.testing.assert_allclose(got, full / np.linalg.norm(full, axis=1, keepdims=True), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_usage_counts_the_real_tokens(client, reference):
    result = client.embeddings.create(model="tiny", input=TEXTS, extra_body={"input_type": "query"})
    expected = sum(len(reference.tokenizer("query: " + t)["input_ids"]) for t in TEXTS)
    assert result.usage.prompt_tokens == result.usage.total_tokens == expected


def test_models_are_served_under_their_given_names(client, server, reference, tiny_bert_dir):
    assert sorted(m.id for m in client.models.list().data) == ["plain", "tiny"]
    plain = client.embeddings.create(model="plain", input=TEXTS, encoding_format="float")
    assert plain.model == "plain"
    got = np.array([d.embedding for d in plain.data], dtype=np.float32)
    np.testing.assert_allclose(got, encode_passages(tiny(tiny_bert_dir, prompts=False), TEXTS), atol=1e-5)
    card = httpx.get(f"{server.url}/v1/models/tiny", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert card["dimension"] == 32 and card["matryoshka_dims"] == [8, 16] and card["max_tokens"] == 64


# ----------------------------------------------------------------------------------- NIM fields


def test_token_id_inputs_equal_their_text(server, reference):
    ids = reference.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    as_ids = vectors(post(server, {"model": "tiny", "input": ids, "encoding_format": "float"}))
    as_list = vectors(post(server, {"model": "tiny", "input": [ids, ids[:3]]}))
    as_text = vectors(post(server, {"model": "tiny", "input": TEXTS[0]}))
    np.testing.assert_allclose(as_ids, as_text, atol=1e-5)
    np.testing.assert_allclose(as_list[0], as_text[0], atol=1e-5)
    assert as_list.shape == (2, 32)


def test_truncate_none_is_a_nim_style_400(server):
    error = assert_openai_error(post(server, {"model": "tiny", "input": ["short", LONG]}), 400,
                                "input_too_long")
    assert "exceeds maximum allowed token size 64" in error["message"] and "Input length" in error["message"]


def test_truncate_end_equals_the_local_models_truncation(server, reference):
    got = vectors(post(server, {"model": "tiny", "input": LONG, "truncate": "END"}))
    np.testing.assert_allclose(got, encode_passages(reference, [LONG]), atol=1e-5)
    usage = post(server, {"model": "tiny", "input": LONG, "truncate": "END"}).json()["usage"]
    assert usage["prompt_tokens"] == 64


def test_truncate_start_keeps_the_prompt_and_the_end_of_the_text(server, reference):
    body = reference.tokenizer(LONG + " final words", add_special_tokens=False)["input_ids"]
    prompt = reference.tokenizer("passage: ", add_special_tokens=False)["input_ids"]
    room = 64 - 2 - len(prompt)  # [CLS] and [SEP]
    got = vectors(post(server, {"model": "tiny", "input": LONG + " final words", "truncate": "start"}))
    tail = vectors(post(server, {"model": "tiny", "input": body[-room:]}))  # server adds prompt + specials
    np.testing.assert_allclose(got, tail, atol=1e-5)


# ----------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("body", [
    {"model": "tiny", "input": ""},
    {"model": "tiny", "input": ["ok", ""]},
    {"model": "tiny", "input": []},
    {"model": "tiny", "input": [[1, 2], []]},
    {"model": "tiny", "input": ["x"] * 17},  # max_inputs is 16 here
    {"model": "tiny", "input": "x", "dimensions": 0},
    {"model": "tiny", "input": "x", "dimensions": 33},  # > model dimension
    {"model": "tiny", "input": "x", "dimensions": 12},  # not a trained Matryoshka size
    {"model": "tiny", "input": [5, 10 ** 9]},  # token id outside the vocabulary
    {"input": "x"},  # two models served: model is required
])
def test_bad_requests_are_400(server, body):
    error = assert_openai_error(post(server, body), 400)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [
    {"model": "tiny", "input": 123},
    {"model": "tiny", "input": [1.5]},
    {"model": "tiny", "input": [None]},
    {"model": "tiny", "input": ["a", 1]},
    {"model": "tiny", "input": [True]},
    {"model": "tiny"},
    {"model": "tiny", "input": "x", "encoding_format": "hex"},
    {"model": "tiny", "input": "x", "input_type": "question"},
    {"model": "tiny", "input": "x", "truncate": "MIDDLE"},
    {"model": "tiny", "input": "x", "dimensions": "16"},
    {"model": "tiny", "input": "x", "dimension": 16},  # misspelt field
    ["not", "an", "object"],
])
def test_wrong_types_are_422_in_openai_shape(server, body):
    error = assert_openai_error(post(server, body), 422)
    assert error["param"] is None or isinstance(error["param"], str)


def test_invalid_json_is_422(server):
    response = httpx.post(f"{server.url}/v1/embeddings", content=b'{"model": "tiny", "input": [',
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert "not valid JSON" in assert_openai_error(response, 422)["message"]


def test_unknown_model_is_404_and_the_client_raises_not_found(client, server):
    assert_openai_error(post(server, {"model": "nope", "input": "x"}), 404, "model_not_found")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="x")


def test_unknown_route_is_404_in_openai_shape(server):
    assert_openai_error(httpx.get(f"{server.url}/v1/nothing-here"), 404)


def test_api_key_is_required_and_checked(server):
    assert_openai_error(post(server, {"model": "tiny", "input": "x"}, key=None), 401, "invalid_api_key")
    assert_openai_error(post(server, {"model": "tiny", "input": "x"}, key="wrong"), 401)
    assert_openai_error(httpx.get(f"{server.url}/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0).embeddings.create(
            model="tiny", input="x")
    # probes and scrapers need no key
    assert httpx.get(f"{server.url}/v1/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v1/health/ready").status_code == 200


def test_oversized_body_is_413(server):
    big = {"model": "tiny", "input": ["word " * 2000] * 10}  # ~100 kB > 64 KiB limit
    assert_openai_error(post(server, big), 413, "request_too_large")


def test_request_token_budget_is_413_counted_after_tokenisation(server):
    # 8 inputs truncated to the tiny model's 64 tokens = 512 tokens > 300; the body is only ~10 kB.
    too_many = {"model": "tiny", "input": [LONG] * 8, "truncate": "END"}
    error = assert_openai_error(post(server, too_many), 413, "request_too_large")
    assert "512 tokens" in error["message"] and "max_request_tokens" in error["message"]
    fits = {"model": "tiny", "input": [LONG] * 4, "truncate": "END"}  # 256 tokens
    assert post(server, fits).json()["usage"]["prompt_tokens"] == 256


def raw_post(server, body: bytes, authorization: bytes = f"Bearer {KEY}".encode()) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/embeddings", content=body, timeout=30,
                      headers={"Authorization": authorization, "Content-Type": "application/json"})


@pytest.mark.parametrize(("body", "param"), [
    (rb'{"model": "tiny", "input": "a\ud800b"}', "input"),  # JSON may escape a lone surrogate
    (rb'{"model": "tiny", "input": ["fine", "\udfff"]}', "input.1"),
    (rb'{"model": "\udc00", "input": "x"}', "model"),  # would be echoed in the 404 message
    (rb'{"model": "tiny", "input": "x", "user": "\ud83d"}', "user"),
])
def test_lone_surrogate_is_a_4xx_naming_the_field(server, body, param):
    error = assert_openai_error(raw_post(server, body), 422, "invalid_unicode")
    assert error["param"] == param and "surrogate" in error["message"]


def test_non_ascii_bearer_token_is_401_not_500(server):
    for token in ("sekrét".encode(), b"\xff\xfe", "ключ".encode()):
        assert_openai_error(raw_post(server, b'{"model": "tiny", "input": "x"}', b"Bearer " + token), 401,
                            "invalid_api_key")


@pytest.mark.parametrize("body", [
    b'{"model": "tiny", "input": "caf\xe9"}',  # Latin-1, not UTF-8
    b'{"model": "tiny", "input": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",  # nested 30k deep (limit 64 KiB)
])
def test_undecodable_bodies_are_400_in_openai_shape(server, body):
    assert_openai_error(raw_post(server, body), 400, "invalid_body")


def test_unknown_model_name_is_not_echoed_in_full(server):
    error = assert_openai_error(post(server, {"input": "x", "model": "m" * 50_000}), 404, "model_not_found")
    assert len(error["message"]) < 500 and "50000 characters" in error["message"]


def test_server_survives_garbage_and_still_answers_correctly(server, reference):
    for payload in (b"\xff\xfe\x00", b"null", b"[]", b'{"input": {"a": 1}}', b"0" * 1000):
        response = httpx.post(f"{server.url}/v1/embeddings", content=payload,
                              headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
        assert response.status_code in (400, 422), response.text
    np.testing.assert_allclose(vectors(post(server, {"model": "tiny", "input": TEXTS})),
                               encode_passages(reference, TEXTS), atol=1e-5)


# ----------------------------------------------------------------------------------- probes, metrics


def test_metrics_count_requests_and_batches_at_both_paths(server):
    post(server, {"model": "tiny", "input": "x"})
    post(server, {"model": "nope", "input": "x"})
    for path in ("/metrics", "/v1/metrics"):
        text = httpx.get(f"{server.url}{path}").text
        assert 'embedtune_requests_total{endpoint="/v1/embeddings",status="200"}' in text
        assert 'embedtune_requests_total{endpoint="/v1/embeddings",status="404"}' in text
        assert "embedtune_request_seconds_bucket" in text
        assert 'embedtune_batch_size_count{model="tiny"}' in text
        assert 'embedtune_queue_depth{model="tiny"}' in text


# ----------------------------------------------------------------------------------- tools around it


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded"])
def test_json_body_without_a_json_content_type_is_accepted(server, reference, content_type):
    """`curl -d '{...}'` (form type) and clients that send no Content-Type get their JSON read."""
    headers = {"Authorization": f"Bearer {KEY}", **({"Content-Type": content_type} if content_type else {})}
    body = b'{"model": "tiny", "input": ["stars"], "encoding_format": "float"}'
    response = httpx.post(f"{server.url}/v1/embeddings", content=body, headers=headers, timeout=30)
    assert response.request.headers.get("content-type") == content_type
    assert np.allclose(vectors(response), encode_passages(reference, ["stars"]), atol=1e-5)


def test_a_declared_non_json_content_type_is_still_refused(server):
    response = httpx.post(f"{server.url}/v1/embeddings", content=b'{"model": "tiny", "input": "x"}', timeout=30,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "text/plain"})
    assert_openai_error(response, 422)


def test_docs_page_is_served_unless_turned_off(server):
    page = httpx.get(f"{server.url}/docs", timeout=30)
    assert page.status_code == 200 and "swagger" in page.text.lower() and "/openapi.json" in page.text
    from fastapi.testclient import TestClient

    off = TestClient(create_app([ModelEntry("tiny", "", lambda: None)], CONFIG, docs=False))
    assert off.get("/docs").status_code == 404 and off.get("/openapi.json").status_code == 200
