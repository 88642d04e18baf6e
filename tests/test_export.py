"""Export: the ONNX folder contract, parity with PyTorch, int8, in-graph pooling/normalise/Matryoshka."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from embedtune.config import ExportConfig
from embedtune.convert.quantize import sensitive_matmuls
from embedtune.export import OnnxEncoder, export_onnx

TEXTS = [
    "x",
    "how do vaccines work",
    "Telescopes collect light from distant galaxies. " * 20,  # past the tiny model's 64 tokens
    "Bond prices fall when rates rise, because new bonds pay more.",
    "sails",
]
CONTRACT_KEYS = {"dimension", "matryoshka_dims", "max_seq_length", "prompts", "inputs", "output", "opset",
                 "pooling", "source"}


def _st(folder: Path, pooling: str = "mean", prompts: dict[str, str] | None = None):
    """The tiny BERT with another pooling mode / prompts (same encoder weights)."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    base = SentenceTransformer(str(folder), device="cpu")
    return SentenceTransformer(modules=[base[0], Pooling(32, pooling_mode=pooling), Normalize()], device="cpu",
                               prompts=prompts)


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture(scope="module")
def bert_export(tiny_bert_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bert-onnx")
    export_onnx(tiny_bert_dir, out, matryoshka_dims=[16, 8, 999])
    return out


def test_export_folder_follows_the_serving_contract(bert_export, tiny_bert_dir):
    from transformers import AutoTokenizer

    meta = json.loads((bert_export / "embedtune.json").read_text())
    assert set(meta) == CONTRACT_KEYS
    assert meta["dimension"] == 32 and meta["max_seq_length"] == 64 and meta["opset"] == 17
    assert meta["matryoshka_dims"] == [32, 16, 8]  # out-of-range 999 dropped, full size added
    assert meta["pooling"] == "mean" and meta["output"] == "embeddings"
    assert meta["prompts"] == {"query": "", "document": ""}
    assert meta["source"] == str(tiny_bert_dir)
    model = onnx.load(str(bert_export / "model.onnx"))
    assert [i.name for i in model.graph.input] == meta["inputs"]
    assert meta["inputs"] == ["input_ids", "attention_mask", "token_type_ids", "dimensions"]
    assert [o.name for o in model.graph.output] == ["embeddings"]
    assert {o.domain: o.version for o in model.opset_import}[""] == 17
    ids_shape = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in ids_shape] == ["batch", "sequence"]  # dynamic, not traced sizes
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert (bert_export / "model.int8.onnx").is_file()
    assert AutoTokenizer.from_pretrained(str(bert_export / "tokenizer"))("hello")["input_ids"]


def test_fp32_onnx_matches_pytorch_at_any_batch_size_and_length(bert_export, tiny_bert_dir):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(tiny_bert_dir), device="cpu")
    enc = OnnxEncoder(bert_export, "fp32")
    ref = st.encode(TEXTS, normalize_embeddings=True)
    for batch_size in (1, 2, 5):  # shapes other than the traced one
        got = enc.encode(TEXTS, batch_size=batch_size)
        assert got.dtype == np.float32 and got.shape == (len(TEXTS), 32)
        assert _cos(got, ref).min() >= 0.9999


def test_encoder_batches_texts_by_token_length_and_restores_their_order(bert_export, monkeypatch):
    enc = OnnxEncoder(bert_export, "fp32")
    texts = [TEXTS[i] for i in (2, 0, 3, 1, 2, 4, 3, 0)]  # lengths mixed in arrival order
    one_by_one = np.vstack([enc.encode([t]) for t in texts])
    batches: list[tuple[int, list[int]]] = []
    real = enc.run_tokens

    def spy(tokens, dimensions=None):
        batches.append((tokens["input_ids"].shape[1], tokens["attention_mask"].sum(1).tolist()))
        return real(tokens, dimensions)

    monkeypatch.setattr(enc, "run_tokens", spy)
    got = enc.encode(texts, batch_size=3)
    lengths = [n for _, batch in batches for n in batch]
    assert lengths == sorted(lengths, reverse=True)  # longest first by token count, across batches
    assert all(width == max(batch) for width, batch in batches)  # each batch pads only to its own longest
    assert _cos(got, one_by_one).min() >= 0.9999  # and every vector is back at its text's position
    assert enc.encode([]).shape == (0, 32)


def test_dimensions_input_truncates_then_renormalises(bert_export):
    enc = OnnxEncoder(bert_export, "fp32")
    full = enc.encode(TEXTS)
    cut = enc.encode(TEXTS, dimensions=8)
    assert cut.shape == (len(TEXTS), 8)
    np.testing.assert_allclose(np.linalg.norm(cut, axis=1), 1.0, atol=1e-5)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(cut, expected, atol=1e-5)
    np.testing.assert_allclose(enc.encode(TEXTS, dimensions=32), full, atol=1e-6)


def test_int8_fuses_and_quantises_every_weighted_matmul_of_an_encoder_by_default(bert_export):
    fp32_graph = onnx.load(str(bert_export / "model.onnx"))
    int8_graph = onnx.load(str(bert_export / "model.int8.onnx"))
    ops = [n.op_type for n in int8_graph.graph.node]
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops
    assert "QAttention" in ops and "Attention" not in ops  # fused by onnxruntime, then its QKV quantised
    assert "Attention" not in {n.op_type for n in fp32_graph.graph.node}  # the fp32 graph stays plain ONNX
    weights = {init.name for init in int8_graph.graph.initializer}
    fp32_weighted = [n.name for n in int8_graph.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert fp32_weighted == []  # the FFN down-projections too (auto: per-channel int8 loses nothing there)
    fp32, int8 = OnnxEncoder(bert_export, "fp32"), OnnxEncoder(bert_export, "int8")
    assert _cos(int8.encode(TEXTS), fp32.encode(TEXTS)).min() > 0.95


def test_int8_keeps_the_ffn_down_projections_fp32_when_asked(bert_export, tmp_path):
    from embedtune.convert.quantize import quantize_int8

    kept = sensitive_matmuls(bert_export / "model.onnx")
    assert len(kept) == 2  # one FFN down-projection per layer of the 2-layer model
    assert all("output/dense" in name and "attention" not in name for name in kept)
    out = tmp_path / "model.int8.onnx"
    record = quantize_int8(bert_export / "model.onnx", out, exclude_sensitive=True, quantize_attention=False)
    graph = onnx.load(str(out)).graph
    assert record["kept_fp32"] == 2 and set(kept) <= {n.name for n in graph.node if n.op_type == "MatMul"}
    assert "QAttention" not in {n.op_type for n in graph.node}


@pytest.mark.parametrize("pooling", ["cls", "lasttoken"])
def test_the_models_own_pooling_is_in_the_graph(tiny_bert_dir, tmp_path, pooling):
    st = _st(tiny_bert_dir, pooling)
    result = export_onnx(st, tmp_path, ExportConfig(int8=False))
    assert result.metadata["pooling"] == pooling
    got = OnnxEncoder(tmp_path, "fp32").encode(TEXTS, batch_size=3)
    assert _cos(got, st.encode(TEXTS, normalize_embeddings=True)).min() >= 0.9999
    mean = _st(tiny_bert_dir, "mean").encode(TEXTS, normalize_embeddings=True)
    assert _cos(got, mean).min() < 0.999  # really a different pooling, not mean again


def test_prompts_are_exported_and_prepended(tiny_bert_dir, tmp_path):
    st = _st(tiny_bert_dir, prompts={"query": "query: ", "document": "passage: "})
    export_onnx(st, tmp_path, ExportConfig(int8=False))
    enc = OnnxEncoder(tmp_path, "fp32")
    assert enc.prompts == {"query": "query: ", "document": "passage: "}
    q = enc.encode(TEXTS, prompt_name="query")
    assert _cos(q, st.encode_query(TEXTS, normalize_embeddings=True)).min() >= 0.9999
    d = enc.encode(TEXTS, prompt_name="document")
    assert _cos(d, st.encode_document(TEXTS, normalize_embeddings=True)).min() >= 0.9999
    assert _cos(q, enc.encode(TEXTS)).min() < 0.9999
    with pytest.raises(ValueError, match="unknown prompt"):
        enc.encode(TEXTS, prompt_name="nope")


def test_encoder_rejects_bad_requests_clearly(bert_export, tmp_path):
    enc = OnnxEncoder(bert_export, "fp32")
    with pytest.raises(ValueError, match="between 1 and 32"):
        enc.encode(["a"], dimensions=33)
    with pytest.raises(ValueError, match="precision"):
        OnnxEncoder(bert_export, "int4")  # type: ignore[arg-type]
    (tmp_path / "embedtune.json").write_text((bert_export / "embedtune.json").read_text())
    with pytest.raises(Exception, match="no int8 model"):
        OnnxEncoder(tmp_path, "int8")


def test_gpu_precisions_are_skipped_with_a_reason_on_cpu(tiny_bert_dir, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the skip path does not apply")
    result = export_onnx(tiny_bert_dir, tmp_path, ExportConfig(int8=False, gpu_precisions=["fp16", "fp8"]))
    assert {p: r["status"] for p, r in result.gpu.items()} == {"fp16": "skipped", "fp8": "skipped"}
    assert all("CUDA" in r["reason"] for r in result.gpu.values())
    assert not (tmp_path / "model.fp16.onnx").exists() and not (tmp_path / "model.int8.onnx").exists()


def test_reexport_replaces_files_and_drops_stale_precisions(tiny_bert_dir, tmp_path):
    export_onnx(tiny_bert_dir, tmp_path)
    assert (tmp_path / "model.int8.onnx").is_file()
    export_onnx(tiny_bert_dir, tmp_path, ExportConfig(int8=False))
    assert not (tmp_path / "model.int8.onnx").exists()
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]  # no staging left


def test_a_new_format_is_one_registry_entry(tiny_bert_dir, tmp_path, monkeypatch):
    """A format added to the two tables (file contract + builder) is built, listed and cleaned up when dropped."""
    import shutil

    from embedtune.convert import formats
    from embedtune.retrieval import formats as files

    def build_copy(ctx: formats.BuildContext) -> dict:
        shutil.copyfile(ctx.fp32, ctx.path("copy"))
        return {"status": "built", "path": ctx.path("copy").name}

    monkeypatch.setitem(files.MODEL_FORMATS, "copy", files.ModelFile("copy", "model.copy.onnx", "any", False))
    monkeypatch.setitem(formats.FORMATS, "copy", formats.ExportFormat("copy", lambda cfg: not cfg.int8, build_copy,
                                                                      parity_vs_fp32=False))
    result = export_onnx(tiny_bert_dir, tmp_path, ExportConfig(int8=False, gpu_precisions=[]))
    assert result.formats == {"copy": {"status": "built", "path": "model.copy.onnx"}}
    assert tmp_path / "model.copy.onnx" in result.files
    assert (tmp_path / "model.copy.onnx").read_bytes() == (tmp_path / "model.onnx").read_bytes()
    export_onnx(tiny_bert_dir, tmp_path, ExportConfig(int8=True, gpu_precisions=[]))
    assert not (tmp_path / "model.copy.onnx").exists() and (tmp_path / "model.int8.onnx").is_file()


def test_every_export_format_has_a_file_row():
    from embedtune.convert.formats import FORMATS
    from embedtune.retrieval.formats import MODEL_FORMATS

    assert set(FORMATS) <= set(MODEL_FORMATS) and "fp32" in MODEL_FORMATS
    assert len({f.file for f in MODEL_FORMATS.values()}) == len(MODEL_FORMATS)


def test_llama_backbone_is_exported_bidirectional(tiny_llama_dir, tmp_path):
    """The graph gives the decoder a full attention mask; reference: transformers' own bidirectional path."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import AutoTokenizer, LlamaModel

    causal = SentenceTransformer(modules=[Transformer(str(tiny_llama_dir), max_seq_length=64), Pooling(32, "mean"),
                                          Normalize()], device="cpu")
    result = export_onnx(causal, tmp_path, ExportConfig(int8=False), bidirectional=True)
    assert result.metadata["inputs"] == ["input_ids", "attention_mask", "dimensions"]
    got = OnnxEncoder(tmp_path, "fp32").encode(TEXTS, batch_size=5)

    ref_model = LlamaModel.from_pretrained(str(tiny_llama_dir), attn_implementation="eager").eval()
    ref_model.config.is_causal = False
    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    batch = tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        hidden = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    ref = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert _cos(got, ref).min() >= 0.9999
    assert _cos(got, causal.encode(TEXTS, normalize_embeddings=True)).min() < 0.99  # not the causal model


def test_decoder_attention_is_kept_as_the_model_runs_it_by_default(tiny_llama_dir, tmp_path):
    """Without bidirectional=True a causal decoder embedder stays causal, matching PyTorch."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer

    causal = SentenceTransformer(modules=[Transformer(str(tiny_llama_dir), max_seq_length=64),
                                          Pooling(32, "lasttoken"), Normalize()], device="cpu")
    export_onnx(causal, tmp_path, ExportConfig(int8=False))
    got = OnnxEncoder(tmp_path, "fp32").encode(TEXTS, batch_size=5)
    assert _cos(got, causal.encode(TEXTS, normalize_embeddings=True)).min() >= 0.9999


def test_serving_precision_is_int8_on_a_cpu_fp32_on_a_gpu_and_a_missing_file_is_named(tmp_path):
    from embedtune.retrieval.precision import pick_precision

    (tmp_path / "model.onnx").write_bytes(b"x")
    assert pick_precision(tmp_path, on_gpu=False) == "fp32"  # no int8 exported
    (tmp_path / "model.int8.onnx").write_bytes(b"x")
    assert pick_precision(tmp_path, on_gpu=False) == "int8"
    assert pick_precision(tmp_path, on_gpu=True) == "fp32"
    assert pick_precision(tmp_path, on_gpu=True, precision="int8") == "int8"
    with pytest.raises(FileNotFoundError, match="model.fp16.onnx"):
        pick_precision(tmp_path, on_gpu=True, precision="fp16")


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_export_folder_loads_the_way_optimum_loads_it(bert_export, precision):
    """What ORTModelForFeatureExtraction.from_pretrained(folder) does: AutoConfig and AutoTokenizer on the
    folder itself, a session on the model file, fed only the inputs the session lists (the tokenizer's)."""
    import onnxruntime as ort
    from transformers import AutoConfig, AutoTokenizer

    from embedtune.retrieval.onnx import OnnxEncoder

    assert AutoConfig.from_pretrained(str(bert_export)).model_type == "bert"
    tokenizer = AutoTokenizer.from_pretrained(str(bert_export))
    name = "model.onnx" if precision == "fp32" else "model.int8.onnx"
    session = ort.InferenceSession(str(bert_export / name), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert names == ["input_ids", "attention_mask", "token_type_ids"]
    assert [i.name for i in session.get_overridable_initializers()] == ["dimensions"]
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="np")
    out = session.run(None, {n: batch[n].astype(np.int64) for n in names})[0]
    ours = OnnxEncoder(bert_export, precision).encode(TEXTS)
    assert out.shape == (len(TEXTS), 32) and np.allclose(out, ours, atol=1e-5)


def test_served_int8_vectors_do_not_depend_on_the_batch(bert_export):
    """Dynamic int8 quantises each MatMul's input with one scale per batch (padding included). The server runs
    each int8 text alone, so a client's vector is the same whatever other clients' texts share its batch."""
    from embedtune.serve import OnnxBackend

    backend = OnnxBackend(bert_export, precision="int8")
    query = "how do vaccines work"
    alone = backend.encode([query], "query")
    for crowd in (TEXTS, TEXTS[2:3] * 4, ["y"] * 7):
        np.testing.assert_allclose(backend.encode([*crowd, query], "query")[-1:], alone, atol=1e-6, rtol=0)
