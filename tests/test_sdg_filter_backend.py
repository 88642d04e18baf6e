"""The sdg filters' encoder backend: the cached ONNX int8 export of the base model decides as torch does,
is exported once per model identity and reused, and a model ONNX cannot take falls back to torch."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from embedtune.config import load_recipe
from embedtune.convert import onnx_export
from embedtune.schemas import Chunk
from embedtune.sdg import Candidate, Generator
from embedtune.sdg.filters import QueryFilter


class NoGeneration(Generator):
    kind = "none"

    def generate(self, chunks, counts):
        return []


def _chunks(docs) -> list[Chunk]:
    return [Chunk(_id=f"{d['_id']}#0", doc_id=d["_id"], title=d["title"], text=d["text"]) for d in docs]


def _candidates(chunks: list[Chunk]) -> list[Candidate]:
    """Two question-shaped queries per chunk from its own words: some rank their chunk first, some lower."""
    out = []
    for c in chunks:
        words = [w.strip(".").lower() for w in c.text.split()]
        w = [words[i % len(words)] for i in (1, 7, 13, 20)]
        topic = c.doc_id.split("-")[0]
        for text in (f"which {topic} ideas relate to {w[0]} and {w[1]}", f"how does {w[2]} affect {w[3]} in {topic}"):
            out.append(Candidate(text=text, positive_ids=[c.id], doc_id=c.doc_id, source=c.id))
    return out


def _filter(model_dir, backend: str, chunks, tmp_path, top_k: int = 5) -> tuple[QueryFilter, dict[str, int]]:
    recipe = load_recipe(None, [f"model.name={model_dir}", f"sdg.filters.backend={backend}",
                                "sdg.filters.roundtrip=true", f"sdg.filters.roundtrip_top_k={top_k}",
                                "sdg.filters.roundtrip_min_rank=2", "sdg.dedup_threshold=0.999"])
    qf = QueryFilter(recipe, NoGeneration(recipe, None, tmp_path), chunks, Counter(), tmp_path / f"emb-{backend}")
    result = qf.apply(_candidates(chunks))
    return qf, {c.text: c.roundtrip_rank for c in result.kept} | {c.text: -1 for c, _ in result.rejected}


@pytest.fixture
def export_calls(monkeypatch, tmp_path):
    """Counts real exports (the function still runs) in a cache of this test's own."""
    monkeypatch.setenv("EMBEDTUNE_CACHE", str(tmp_path / "cache"))
    calls = []
    real = onnx_export.export_onnx

    def spy(*args, **kw):
        calls.append(args[1])
        return real(*args, **kw)

    monkeypatch.setattr(onnx_export, "export_onnx", spy)
    return calls


def test_onnx_int8_filters_keep_what_torch_keeps_and_the_export_is_reused(tmp_path, topical_docs, tiny_bert_dir,
                                                                          export_calls):
    chunks = _chunks(topical_docs)
    torch_qf, torch_kept = _filter(tiny_bert_dir, "torch", chunks, tmp_path)
    onnx_qf, onnx_kept = _filter(tiny_bert_dir, "onnx-int8", chunks, tmp_path)
    assert torch_qf.backend == "torch" and onnx_qf.backend == "onnx-int8"
    assert len(export_calls) == 1
    assert set(torch_kept.values()) - {-1}, "the fixture must keep some queries, or agreement proves nothing"
    assert any(v == -1 for v in torch_kept.values()), "...and drop some"
    disagree = [t for t in torch_kept if (torch_kept[t] == -1) != (onnx_kept[t] == -1)]
    assert disagree == [], f"int8 decided otherwise than torch on {disagree}"

    # A second run (a new filter, as in a new process) takes the export from the cache.
    again_qf, again_kept = _filter(tiny_bert_dir, "onnx-int8", chunks, tmp_path / "again")
    assert len(export_calls) == 1 and again_qf.backend == "onnx-int8"
    assert again_kept == onnx_kept


def test_a_model_onnx_cannot_take_falls_back_to_torch_with_a_log_line(tmp_path, topical_docs, tiny_bert_dir,
                                                                       export_calls, caplog):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

    base = SentenceTransformer(str(tiny_bert_dir), device="cpu")
    # Pooling that leaves the prompt out needs the prompt length, which the exported graph does not know.
    odd = SentenceTransformer(modules=[base[0], Pooling(32, pooling_mode="mean", include_prompt=False),
                                       Normalize()], device="cpu")
    folder = tmp_path / "no-onnx-model"
    odd.save(str(folder))
    chunks = _chunks(topical_docs)
    with caplog.at_level(logging.WARNING, logger="embedtune"):
        qf, kept = _filter(folder, "onnx-int8", chunks, tmp_path)
    assert qf.backend == "torch"
    assert "encoding with torch fp32 instead" in caplog.text and "include_prompt" in caplog.text
    assert kept == _filter(folder, "torch", chunks, tmp_path / "torch")[1]
    assert not (tmp_path / "cache" / "onnx").exists() or not any((tmp_path / "cache" / "onnx").iterdir())


def test_prep_mines_with_the_int8_chunk_embeddings_sdg_left_in_the_run_cache(tmp_path, tiny_bert_dir, export_calls,
                                                                              monkeypatch, caplog):
    import embedtune.models
    from embedtune.prep import run_prep
    from embedtune.schemas import TrainExample, read_rows
    from test_prep import make_chunks, make_queries, make_run

    chunks = make_chunks()
    run = make_run(tmp_path / "run", chunks, make_queries(chunks))
    overrides = [f"model.name={tiny_bert_dir}", "sdg.filters.backend=onnx-int8", "sdg.filters.roundtrip=true",
                 "prep.test_ratio=0.25",
                 "prep.teacher=dense", "prep.fill_missing=drop", "prep.negatives_used=1"]
    recipe = load_recipe(None, overrides)
    QueryFilter(recipe, NoGeneration(recipe, None, tmp_path), chunks, Counter(),
                run.root / "cache" / "embeddings").apply(_candidates(chunks[::2]))

    def no_torch(*args, **kw):
        raise AssertionError("prep loaded the torch model although sdg's int8 backend was chosen")

    monkeypatch.setattr(embedtune.models, "load_model", no_torch)
    with caplog.at_level(logging.INFO, logger="embedtune"):
        manifest = run_prep(recipe, run)
    assert f"base model (onnx int8): {len(chunks)} passage embeddings from the cache" in caplog.text
    assert len(export_calls) == 1  # sdg exported, prep reused the export
    train = list(read_rows(run.path("prep", "train.jsonl"), TrainExample))
    assert train and manifest.counts["mined_negatives"] > 0


def test_the_shipped_default_models_cached_export_passes_its_probe_check(export_calls, caplog):
    """The filters' int8 export of all-MiniLM-L6-v2 reproduces torch (the serving int8, with attention and FFN
    down-projections quantised, measured 0.977 on the probe texts and fell back to torch on SciFact)."""
    from embedtune.convert.cached import cached_int8_encoder
    from embedtune.models import encode_passages, load_model

    caplog.set_level(logging.WARNING, logger="embedtune")
    encoder = cached_int8_encoder("default")
    assert len(export_calls) == 1 and "unavailable" not in caplog.text
    texts = ["Aspirin lowers the risk of a second heart attack.", "Telomeres shorten as cells divide."]
    got = encoder.encode(texts, "passage")
    want = encode_passages(load_model("default", device="cpu"), texts)
    assert float((got * want).sum(axis=1).min()) > 0.99


def _tagged_chunks_and_queries(n: int = 12) -> tuple[list[Chunk], list[Candidate]]:
    """Chunks of shared words, each with one word of its own, and a query per chunk naming that word: BM25
    ranks every query's chunk first, a tiny random model mostly does not."""
    filler = ["cells", "membranes", "proteins", "signalling", "pathways", "receptors", "enzymes"]
    chunks = [Chunk(_id=f"d{i}#0", doc_id=f"d{i}", title="", text=" ".join(filler[i % 7:] + filler[:i % 7])
                    + f" zqx{i}word appears here") for i in range(n)]
    queries = [Candidate(text=f"what is known about zqx{i}word in {filler[(i * 3) % 7]}", positive_ids=[c.id],
                         doc_id=c.doc_id, source=c.id) for i, c in enumerate(chunks)]
    return chunks, queries


def _roundtrip(model_dir, tmp_path, by: str, language: str = "en"):
    recipe = load_recipe(None, [f"model.name={model_dir}", "sdg.filters.roundtrip=true",
                                "sdg.filters.roundtrip_top_k=1", f"sdg.filters.roundtrip_by={by}",
                                "prep.bm25_weight=1.0", "sdg.dedup_threshold=1.0", f"corpus.language={language}"])
    chunks, queries = _tagged_chunks_and_queries()
    qf = QueryFilter(recipe, NoGeneration(recipe, None, tmp_path), chunks, Counter(), tmp_path / f"emb-{by}")
    return qf.apply(queries)


def test_hybrid_roundtrip_keeps_queries_bm25_confirms_and_counts_those_the_base_model_missed(tmp_path,
                                                                                           tiny_bert_dir):
    dense = _roundtrip(tiny_bert_dir, tmp_path, "dense")
    hybrid = _roundtrip(tiny_bert_dir, tmp_path, "hybrid")
    assert 0 < len(dense.kept) < 12, "the tiny model must miss some queries, or the test proves nothing"
    assert dense.reasons["roundtrip_miss"] == 12 - len(dense.kept) and dense.rescued_by_bm25 is None
    assert len(hybrid.kept) == 12 and all(c.roundtrip_rank == 1 for c in hybrid.kept)
    assert hybrid.rescued_by_bm25 == 12 - len(dense.kept)


def test_hybrid_roundtrip_falls_back_to_dense_for_unspaced_languages(tmp_path, tiny_bert_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="embedtune"):
        result = _roundtrip(tiny_bert_dir, tmp_path, "hybrid", language="zh")
    assert "sdg.filters.roundtrip_by=hybrid: BM25 cannot split 'zh'" in caplog.text
    assert result.rescued_by_bm25 is None
    assert [c.text for c in result.kept] == [c.text for c in _roundtrip(tiny_bert_dir, tmp_path / "d", "dense").kept]
