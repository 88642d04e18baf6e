"""Resolving --model arguments, tokenising like sentence-transformers, the ONNX adapter, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import onnx
import openai
import pytest
from onnx import TensorProto, helper, numpy_helper

from embedtune.config import ModelConfig
from embedtune.models import encode_passages, encode_queries, load_model
from embedtune.serve import OnnxBackend, create_app, model_entry, start_in_thread
from embedtune.serve.loading import split_model_arg
from embedtune.serve.runner import wait_ready
from embedtune.serve.tokens import InputTooLongError

PROMPTS = {"query": "query: ", "document": "passage: "}


# ------------------------------------------------------------------------------- --model resolution


@pytest.mark.parametrize(("arg", "expected"), [
    ("default", (None, "default")),
    ("mine=runs/x/export", ("mine", "runs/x/export")),
    ("runs/a=b", (None, "runs/a=b")),  # a path with '=' is not a name
    ("org/model", (None, "org/model")),
])
def test_split_model_arg(arg, expected):
    assert split_model_arg(arg) == expected


def test_run_directory_prefers_its_onnx_export(tmp_path, tiny_bert_dir):
    run = tmp_path / "myrun"
    shutil.copytree(tiny_bert_dir, run / "finetune" / "model")
    assert model_entry(str(run)).source == str(run / "finetune" / "model")
    (run / "export").mkdir()
    (run / "export" / "embedtune.json").write_text("{}")
    (run / "export" / "model.onnx").write_bytes(b"")
    auto = model_entry(str(run))
    assert (auto.name, auto.source) == ("myrun", str(run / "export"))
    assert model_entry(str(run / "export")).name == "myrun"
    assert model_entry(str(run), backend="torch").source == str(run / "finetune" / "model")
    assert model_entry(f"prod={run}").name == "prod"


def test_missing_model_or_export_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no ONNX export"):
        model_entry(str(tmp_path), backend="onnx")
    with pytest.raises(FileNotFoundError, match="holds no model"):
        model_entry(str(tmp_path))


def test_torch_model_reads_declared_matryoshka_dims(tmp_path, tiny_bert_dir):
    folder = tmp_path / "m"
    shutil.copytree(tiny_bert_dir, folder)
    (folder / "embedtune.json").write_text(json.dumps({"matryoshka_dims": [16, 8]}))
    backend = model_entry(str(folder)).load()
    assert backend.kind == "torch" and backend.matryoshka_dims == [8, 16] and backend.dimension == 32


# ------------------------------------------------------------------------------- tokenisation


@pytest.fixture(scope="module")
def tiny_backend(tiny_bert_dir):
    from embedtune.serve import TorchBackend

    return TorchBackend(load_model(ModelConfig(name=str(tiny_bert_dir), query_prompt="query: ",
                                               passage_prompt="passage: ")))


def test_tokens_match_sentence_transformers_and_truncate_from_either_side(tiny_backend):
    tok = tiny_backend.tokenization.tokenizer
    cls, sep = tok.cls_token_id, tok.sep_token_id
    assert (tiny_backend.tokenization.prefix, tiny_backend.tokenization.suffix) == ([cls], [sep])
    text = " ".join(f"w{i}" for i in range(100))
    assert tiny_backend.tokenize(["hello there"], "query") == [tok("query: hello there")["input_ids"]]
    with pytest.raises(InputTooLongError, match="exceeds maximum allowed token size 64"):
        tiny_backend.tokenize([text], "query", "NONE")
    full = tok("query: " + text, add_special_tokens=False)["input_ids"]
    prompt = tok("query: ", add_special_tokens=False)["input_ids"]
    (end,) = tiny_backend.tokenize([text], "query", "END")
    (start,) = tiny_backend.tokenize([text], "query", "START")
    assert end == [cls, *full[:62], sep]
    assert start == [cls, *prompt, *full[-(62 - len(prompt)):], sep]
    assert len(end) == len(start) == 64  # the model's max length, special tokens included


def test_one_shot_encode_matches_local_model(tiny_backend, tiny_bert_dir):
    ref = load_model(ModelConfig(name=str(tiny_bert_dir), query_prompt="query: ", passage_prompt="passage: "))
    texts = ["a short one", "a somewhat longer sentence about harbours " * 3]
    np.testing.assert_allclose(tiny_backend.encode(texts, "query"), encode_queries(ref, texts), atol=1e-5)
    np.testing.assert_allclose(tiny_backend.encode(texts), encode_passages(ref, texts), atol=1e-5)


# ------------------------------------------------------------------------------- ONNX adapter


def bag_of_embeddings_graph(table: np.ndarray) -> onnx.ModelProto:
    """A stand-in for the export stage's graph, with its exact I/O contract: mean of token embeddings,
    Matryoshka slice to ``dimensions``, L2 normalisation."""
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["tok"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "minus1"], ["mask3"]),
        helper.make_node("Mul", ["tok", "mask3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "one"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["mask3", "one"], ["count"], keepdims=0),
        helper.make_node("Div", ["summed", "count"], ["mean"]),
        helper.make_node("Slice", ["mean", "zero", "dimensions", "one"], ["cut"]),
        helper.make_node("ReduceL2", ["cut"], ["norm"], axes=[1], keepdims=1),
        helper.make_node("Div", ["cut", "norm"], ["embeddings"]),
    ]
    ints = lambda name, v: numpy_helper.from_array(np.array(v, dtype=np.int64), name)  # noqa: E731
    inits = [numpy_helper.from_array(table, "table"), ints("minus1", [-1]), ints("one", [1]),
             ints("zero", [0])]
    io = lambda name, kind, shape: helper.make_tensor_value_info(name, kind, shape)  # noqa: E731
    graph = helper.make_graph(
        nodes, "bag", [io("input_ids", TensorProto.INT64, ["b", "s"]),
                       io("attention_mask", TensorProto.INT64, ["b", "s"]),
                       io("token_type_ids", TensorProto.INT64, ["b", "s"]),
                       io("dimensions", TensorProto.INT64, [1])],
        [io("embeddings", TensorProto.FLOAT, ["b", "d"])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_bert_dir):
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("run") / "export"
    folder.mkdir()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    rng = np.random.default_rng(0)
    tables = {name: rng.standard_normal((len(tokenizer), 16)).astype(np.float32)
              for name in ("model.onnx", "model.int8.onnx")}
    for name, table in tables.items():
        onnx.save(bag_of_embeddings_graph(table), str(folder / name))
    meta = {"dimension": 16, "matryoshka_dims": [4, 8], "max_seq_length": 64, "prompts": PROMPTS,
            "inputs": ["input_ids", "attention_mask", "token_type_ids"], "output": "embeddings"}
    (folder / "embedtune.json").write_text(json.dumps(meta))
    return folder, tokenizer, tables


def expected_bag(tokenizer, table, texts, prompt, dims=16):
    out = []
    for text in texts:
        v = table[tokenizer(prompt + text)["input_ids"]].mean(axis=0)[:dims]
        out.append(v / np.linalg.norm(v))
    return np.array(out, dtype=np.float32)


def test_onnx_backend_follows_the_export_contract(export_dir):
    folder, tokenizer, tables = export_dir
    texts = ["sails and wind", "a much longer text about harbours, tides and the crew of a boat"]
    auto = OnnxBackend(folder)  # CPU: the int8 graph when present
    assert auto.kind == "onnx-int8" and auto.matryoshka_dims == [4, 8] and auto.max_tokens == 64
    expected = expected_bag(tokenizer, tables["model.int8.onnx"], texts, "query: ")
    np.testing.assert_allclose(auto.encode(texts, "query"), expected, atol=1e-5)
    fp32 = OnnxBackend(folder, precision="fp32")
    expected = expected_bag(tokenizer, tables["model.onnx"], texts, "passage: ", 8)
    np.testing.assert_allclose(fp32.encode(texts, "passage", dimensions=8), expected, atol=1e-5)


def test_server_serves_an_export_folder(export_dir):
    folder, tokenizer, tables = export_dir
    entry = model_entry(f"exported={folder.parent}", precision="fp32")
    with start_in_thread(create_app([entry])) as srv:
        srv.wait_ready()
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        result = client.embeddings.create(model="exported", input=["wind", "tides"], dimensions=4,
                                          extra_body={"input_type": "query"})
        cards = client.models.list().data
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    np.testing.assert_allclose(got, expected_bag(tokenizer, tables["model.onnx"], ["wind", "tides"],
                                                 "query: ", 4), atol=1e-5)
    assert cards[0].id == "exported" and cards[0].backend == "onnx-fp32"


# ------------------------------------------------------------------------------- the CLI, default model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_shipped_default_model_is_served_like_it_encodes_locally():
    with start_in_thread(create_app([model_entry("default")])) as srv:
        srv.wait_ready()
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        texts = ["What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."]
        queries = client.embeddings.create(model="default", input=texts, extra_body={"input_type": "query"})
    model = load_model("default")
    got = np.array([d.embedding for d in queries.data], dtype=np.float32)
    assert got.shape == (2, 384)
    np.testing.assert_allclose(got, encode_queries(model, texts), atol=1e-5)


def _batch_tokens(metrics_text: str, model: str) -> tuple[float, float]:
    """(batches, batches of at most 512 tokens) from the server's Prometheus histogram."""
    from prometheus_client.parser import text_string_to_metric_families

    family = next(f for f in text_string_to_metric_families(metrics_text) if f.name == "embedtune_batch_tokens")
    samples = [s for s in family.samples if s.labels.get("model") == model]
    count = next(s.value for s in samples if s.name.endswith("_count"))
    within = next(s.value for s in samples if s.name.endswith("_bucket") and float(s.labels["le"]) == 512)
    return count, within


def test_cli_builds_the_server_from_flags_recipe_and_env(tmp_path, tiny_bert_dir):
    """`embedtune serve` as a process: models and names from --model, the key from the env var the recipe
    override names, --max-batch-tokens over the recipe file's value (seen in the batches it encodes)."""
    from typer.testing import CliRunner

    from embedtune.cli import app

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("serve:\n  max_batch_tokens: 16384\n")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SERVE_TEST_KEY": "k3y",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "embedtune", "serve", "-c", str(recipe), "--model", f"tiny={tiny_bert_dir}",
           "--model", f"again={tiny_bert_dir}", "--port", str(port), "--max-batch-tokens", "512",
           "-o", "serve.api_key_env=SERVE_TEST_KEY"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    texts = [f"Telescopes {i} collect light from distant galaxies and nebulae over many long nights." * 3
             for i in range(24)]  # 24 inputs of ~64 tokens: ~1,500 tokens, several batches at 512
    try:
        try:
            wait_ready(url, 120, alive=lambda: proc.poll() is None)
        except RuntimeError:
            pytest.fail(proc.stdout.read() if proc.stdout else "server exited")
        assert httpx.get(f"{url}/v1/models").status_code == 401
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)
        assert sorted(m.id for m in client.models.list().data) == ["again", "tiny"]
        result = client.embeddings.create(model="tiny", input=texts)
        batches, within = _batch_tokens(httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer k3y"}).text,
                                        "tiny")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert batches >= 3 and within == batches, (batches, within)
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    np.testing.assert_allclose(got, encode_passages(load_model(str(tiny_bert_dir)), texts), atol=1e-5)
    bad = CliRunner().invoke(app, ["serve", "--model", "/no/such/dir/anywhere", "--backend", "onnx"])
    assert bad.exit_code == 1 and "no ONNX export" in bad.output


@pytest.mark.slow
def test_cli_serves_the_shipped_default_model_and_a_named_one(tiny_bert_dir):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "SERVE_TEST_KEY": "k3y",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "embedtune", "serve", "--model", "default",
           "--model", f"tiny={tiny_bert_dir}", "--port", str(port), "-o", "serve.api_key_env=SERVE_TEST_KEY"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_ready(url, 240, alive=lambda: proc.poll() is None)
        except RuntimeError:
            pytest.fail(proc.stdout.read() if proc.stdout else "server exited")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="k3y", max_retries=0)
        texts = ["What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."]
        result = client.embeddings.create(model="default", input=texts)
        assert sorted(m.id for m in client.models.list().data) == ["default", "tiny"]
        assert httpx.post(f"{url}/v1/embeddings", json={"model": "default", "input": "x"}).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    got = np.array([d.embedding for d in result.data], dtype=np.float32)
    np.testing.assert_allclose(got, encode_passages(load_model("default"), texts), atol=1e-5)


# ------------------------------------------------------------------------------- readiness


def test_ready_is_503_while_loading_and_after_a_failed_load_while_live_stays_200():
    import threading

    from embedtune.serve import ModelEntry

    release = threading.Event()

    def slow_broken_loader():
        release.wait(30)
        raise OSError("weights are corrupt")

    with start_in_thread(create_app([ModelEntry("broken", "/nowhere", slow_broken_loader)])) as srv:
        assert httpx.get(f"{srv.url}/v1/health/live").status_code == 200
        loading = httpx.get(f"{srv.url}/v1/health/ready")
        assert loading.status_code == 503 and loading.json()["error"]["message"] == "models are loading"
        early = httpx.post(f"{srv.url}/v1/embeddings", json={"model": "broken", "input": "x"})
        assert early.status_code == 503 and early.headers["retry-after"] == "5"
        release.set()
        deadline = time.monotonic() + 10
        while "failed" not in httpx.get(f"{srv.url}/v1/health/ready").text and time.monotonic() < deadline:
            time.sleep(0.05)
        failed = httpx.get(f"{srv.url}/v1/health/ready")
        assert failed.status_code == 503 and "weights are corrupt" in failed.json()["error"]["message"]
        late = httpx.post(f"{srv.url}/v1/embeddings", json={"model": "broken", "input": "x"})
        assert late.status_code == 503 and "weights are corrupt" in late.json()["error"]["message"]


def test_micro_batches_hold_similar_lengths_within_the_padding_bound():
    """A server's queries (5 to 46 tokens) are not padded to the longest of 32: each micro-batch pads at most
    MAX_PADDING of its tokens, holds at most `size` inputs, and every input runs exactly once."""
    from embedtune.serve.backends import MAX_PADDING, micro_batches

    rng = np.random.default_rng(0)
    lengths = [int(x) for x in rng.integers(5, 47, size=200)] + [0, 0]
    batches = micro_batches(lengths, 32)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) <= 32
        assert len(b) == 1 or len(b) * longest - sum(lengths[i] for i in b) <= MAX_PADDING * len(b) * longest
    assert max(len(b) for b in batches) == 32  # similar lengths still share a batch
    assert len(micro_batches([16] * 70, 32)) == 3
