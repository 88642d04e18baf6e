"""Integration: a real ONNX export of a trained-shape model, served by the real server, read with openai."""

from __future__ import annotations

import numpy as np
import openai
import pytest

from embedtune.export import export_onnx
from embedtune.models import encode_passages, encode_queries, load_model
from embedtune.serve.app import create_app
from embedtune.serve.loading import model_entry
from embedtune.serve.runner import start_in_thread

TEXTS = ["how do tides work", "Sails catch the wind and the rudder steers the boat across the harbour."]


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory, tiny_bert_dir):
    run = tmp_path_factory.mktemp("run")
    export_onnx(str(tiny_bert_dir), run / "export", matryoshka_dims=[32, 16])
    return run


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-5), ("int8", 0.05)])
def test_run_directory_is_served_from_its_export(exported_run, tiny_bert_dir, precision, atol):
    model = load_model(str(tiny_bert_dir))
    with start_in_thread(create_app([model_entry(f"m={exported_run}", precision=precision)])) as srv:
        srv.wait_ready()
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        queries = client.embeddings.create(model="m", input=TEXTS, extra_body={"input_type": "query"})
        passages = client.embeddings.create(model="m", input=TEXTS, dimensions=16,
                                            extra_body={"input_type": "passage"})
        card = client.models.list().data[0]
    got_q = np.array([d.embedding for d in queries.data], dtype=np.float32)
    got_p = np.array([d.embedding for d in passages.data], dtype=np.float32)
    want_q = encode_queries(model, TEXTS)
    want_p = encode_passages(model, TEXTS)[:, :16]
    want_p /= np.linalg.norm(want_p, axis=1, keepdims=True)
    np.testing.assert_allclose(got_q, want_q, atol=atol)
    np.testing.assert_allclose(got_p, want_p, atol=atol)
    assert card.backend == f"onnx-{precision}"
    assert queries.usage.prompt_tokens > 0
