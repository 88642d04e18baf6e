"""Prep stage: document split, margin-rule mining, fill policies, training/BEIR files, errors, resume."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import make_documents
from embedtune.artifacts import ArtifactError, RunDir, read_json, read_jsonl, write_jsonl
from embedtune.config import PrepConfig, Recipe
from embedtune.prep import run_prep
from embedtune.prep.formats import read_training, write_automodel, write_inline
from embedtune.prep.mining import Mined, mine_from_scores, mine_negatives
from embedtune.prep.split import split_by_document
from embedtune.retrieval.ids import passage_id as doc_id
from embedtune.schemas import Chunk, SyntheticQuery, TrainExample, read_rows

# ------------------------------------------------------------------------------------------ fixtures


def make_chunks(n_per_topic: int = 4) -> list[Chunk]:
    """Each topical document cut into two chunks of two sentences."""
    chunks = []
    for doc in make_documents(n_per_topic):
        sentences = doc["text"].split(". ")
        halves = [". ".join(sentences[:2]) + ".", ". ".join(sentences[2:])]
        for i, text in enumerate(halves):
            chunks.append(Chunk(_id=f"{doc['_id']}#{i}", doc_id=doc["_id"], title=doc["title"], text=text))
    return chunks


def make_queries(chunks: list[Chunk], seed: int = 0) -> list[dict]:
    """One query per chunk (words of the chunk), plus multi-positive queries over two documents."""
    rng = random.Random(seed)
    rows = []
    for c in chunks:
        words = c.text.rstrip(".").split()
        rows.append({"_id": f"q-{c.id}", "text": " ".join(rng.sample(words, 4)), "positive_ids": [c.id],
                     "doc_id": c.doc_id, "generator": {"kind": "test"}})
    for k in range(0, len(chunks) - 2, 5):
        a, b = chunks[k], chunks[k + 2]  # different documents
        rows.append({"_id": f"mh-{k}", "text": f"{a.text.split()[0]} and {b.text.split()[0]}",
                     "positive_ids": [a.id, b.id], "hops": 2, "generator": {"kind": "test"}})
    return rows


def write_stage(run: RunDir, stage: str, name: str, rows: list) -> Path:
    st = run.stage(stage, {})
    st.up_to_date(force=True)
    out = st.dir / name
    write_jsonl(out, rows)
    st.finish(outputs=[out])
    return out


def make_run(root: Path, chunks: list[Chunk], queries: list[dict]) -> RunDir:
    run = RunDir(root)
    write_stage(run, "corpus", "chunks.jsonl", chunks)
    write_stage(run, "sdg", "queries.jsonl", queries)
    return run


def recipe_for(model_dir: Path, **prep) -> Recipe:
    return Recipe(model={"name": str(model_dir)}, prep=prep)


@pytest.fixture(scope="module")
def chunks() -> list[Chunk]:
    return make_chunks()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_bert_dir, chunks):
    """One full run_prep on a run directory written by the test (shared by the read-only tests)."""
    run = make_run(tmp_path_factory.mktemp("run"), chunks, make_queries(chunks))
    # fill_missing=drop: every negative in the output was mined, so the margin rule can be checked on all
    recipe = recipe_for(tiny_bert_dir, test_ratio=0.25, margin=0.95, mining_query_block=3,
                        fill_missing="drop", negatives_used=1, teacher="dense")
    manifest = run_prep(recipe, run)
    return run, recipe, manifest


# ------------------------------------------------------------------------------------------ split


def test_split_by_document_never_leaks_and_sends_mixed_queries_to_test(chunks):
    queries = [SyntheticQuery.model_validate(q) for q in make_queries(chunks)]
    split = split_by_document(queries, chunks, test_ratio=0.25, seed=1, max_pos_docs=5)
    doc_of = {c.id: c.doc_id for c in chunks}
    assert split.test_docs and split.train_docs.isdisjoint(split.test_docs)
    for q in split.train:
        assert all(doc_of[p] in split.train_docs for p in q.positive_ids)
    mixed = [q for q in split.test if any(doc_of[p] in split.train_docs for p in q.positive_ids)]
    assert split.counts["mixed_to_test"] == len(mixed)
    assert len(split.train) + len(split.test) == len(queries)


def test_split_drops_queries_with_too_many_positives(chunks):
    many = SyntheticQuery.model_validate({"_id": "big", "text": "x y z", "generator": {"kind": "t"},
                                          "positive_ids": [c.id for c in chunks[:3]]})
    one = SyntheticQuery.model_validate({"_id": "one", "text": "x y z", "generator": {"kind": "t"},
                                         "positive_ids": [chunks[0].id]})
    split = split_by_document([many, one], chunks, test_ratio=0.0, seed=0, max_pos_docs=2)
    assert split.counts["dropped_too_many_positives"] == 1
    assert [q.id for q in split.train] == ["one"] and not split.test


def test_full_run_has_no_test_document_in_training(prepared, chunks):
    run, _, manifest = prepared
    doc_of = {c.id: c.doc_id for c in chunks}
    test_qids = {q["_id"] for q in read_jsonl(run.path("prep", "eval", "queries.jsonl"))}
    split = read_json(run.path("prep", "split.json"))
    test_docs = set(split["test_documents"])
    assert set(split["test_queries"]) == test_qids
    assert manifest.counts["mixed_to_test"] > 0  # the multi-document queries exercise the rule
    train = list(read_rows(run.path("prep", "train.jsonl"), TrainExample))
    assert train and test_qids and manifest.counts["test_documents"] > 0
    for ex in train:
        assert ex.query_id not in test_qids
        assert not {doc_of[p] for p in ex.pos_ids} & test_docs
        # switch off: held-out chunks are not negatives either
        assert not {doc_of[n] for n in ex.neg_ids} & test_docs


def test_switch_lets_held_out_chunks_be_negatives(tmp_path, tiny_bert_dir, chunks):
    run = make_run(tmp_path, chunks, make_queries(chunks))
    manifest = run_prep(recipe_for(tiny_bert_dir, test_ratio=0.25, test_chunks_as_negatives=True), run)
    test_docs = set(read_json(run.path("prep", "split.json"))["test_documents"])
    doc_of = {c.id: c.doc_id for c in chunks}
    train = list(read_rows(run.path("prep", "train.jsonl"), TrainExample))
    assert manifest.counts["candidates"] == len(chunks)
    assert any(doc_of[n] in test_docs for ex in train for n in ex.neg_ids)
    assert not any(doc_of[p] in test_docs for ex in train for p in ex.pos_ids)  # positives never


def test_all_queries_dropped_is_a_clear_error(tmp_path, tiny_bert_dir, chunks):
    run = make_run(tmp_path, chunks, make_queries(chunks))
    recipe = recipe_for(tiny_bert_dir, margin=10.0, margin_type="abs", fill_missing="drop")
    with pytest.raises(ValueError, match="dropped for lack of negatives"):
        run_prep(recipe, run)


# ------------------------------------------------------------------------------------------ mining rule

SCORES = torch.tensor([
    # cand:  0     1     2     3     4     5
    [0.90, 0.80, 0.78, 0.75, 0.50, 0.20],  # positives 0 and 1 -> weakest 0.80
    [0.30, 0.40, 0.60, 0.10, 0.95, 0.57],  # positive 2 -> weakest 0.60
])


def test_margin_perc_keeps_only_candidates_below_margin_times_weakest_positive():
    mined = mine_from_scores(SCORES, [[0, 1], [2]], k=5, margin=0.95, margin_type="perc")
    # row 0: threshold 0.76 -> 0.78 (cand 2) is a probable false negative; 3,4,5 survive, best first
    assert mined.neg_idx[0] == [3, 4, 5]
    # row 1: threshold 0.57, strictly below -> cand 5 (0.57) and cand 4 (0.95) excluded
    assert mined.neg_idx[1] == [1, 0, 3]
    assert mined.pos_scores == [pytest.approx([0.90, 0.80]), pytest.approx([0.60])]
    assert mined.neg_scores[0] == pytest.approx([0.75, 0.50, 0.20])


def test_margin_abs_subtracts_from_weakest_positive():
    mined = mine_from_scores(SCORES, [[0, 1], [2]], k=2, margin=0.1, margin_type="abs")
    assert mined.neg_idx[0] == [4, 5]  # threshold 0.70: 0.78 and 0.75 are out; top 2 of the rest
    assert mined.neg_idx[1] == [1, 0]  # threshold 0.50


def test_every_positive_and_excluded_candidate_is_masked():
    # positives are NOT the top scorers; a lax margin would let them through if they were not masked
    scores = torch.tensor([[0.2, 0.9, 0.3, 0.95, 0.1, 0.4]])
    mined = mine_from_scores(scores, [[1, 3, 0]], [[5]], k=6, margin=10.0, margin_type="perc")
    assert mined.neg_idx == [[2, 4]]  # threshold 2.0 keeps everything but the masked ones


def test_blocked_mining_equals_one_block():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(11, 8)).astype(np.float32)
    c = rng.normal(size=(40, 8)).astype(np.float32)
    pos = [[int(i), int(i) + 3] for i in rng.integers(0, 30, size=11)]
    excl = [[p[0] + 1] for p in pos]
    kw = dict(k=4, margin=0.5, margin_type="abs", progress=False)
    small = mine_negatives(q, c, pos, excl, block=2, **kw)
    whole = mine_negatives(q, c, pos, excl, block=1000, **kw)
    assert small.neg_idx == whole.neg_idx  # matmul blocking only changes the last float bits
    assert [x for r in small.neg_scores for x in r] == pytest.approx(
        [x for r in whole.neg_scores for x in r], abs=1e-5)
    assert sum(map(len, small.neg_idx)) > 0


# ------------------------------------------------------------------------------------------ fill policies


def _mined_short() -> tuple[Mined, list[list[int]], list[list[int]], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    q = rng.normal(size=(2, 4)).astype(np.float32)
    p = rng.normal(size=(10, 4)).astype(np.float32)
    mined = Mined(neg_idx=[[5, 6, 7, 8], [9]], neg_scores=[[0.4, 0.3, 0.2, 0.1], [0.1]],
                  pos_scores=[[0.9], [0.8]])
    return mined, [[0], [1]], [[1], [2, 3]], q, p


def test_fill_missing_random_tops_up_with_allowed_chunks_and_real_scores():
    from embedtune.prep import fill_missing

    mined, pos, excl, q, p = _mined_short()
    counts = fill_missing(mined, pos, excl, q, p, PrepConfig(negatives_used=4, fill_missing="random"))
    assert counts["random_negatives"] == 3 and counts["still_short"] == 0
    assert mined.neg_idx[0] == [5, 6, 7, 8]  # already enough: untouched
    extra = mined.neg_idx[1][1:]
    assert len(set(mined.neg_idx[1])) == 4 and not set(extra) & {1, 2, 3}
    assert mined.neg_scores[1][1:] == pytest.approx([float(q[1] @ p[j]) for j in extra])


def test_fill_missing_drop_removes_short_queries():
    from embedtune.prep import fill_missing

    mined, pos, excl, q, p = _mined_short()
    counts = fill_missing(mined, pos, excl, q, p, PrepConfig(negatives_used=4, fill_missing="drop"))
    assert counts["dropped_short"] == 1 and mined.neg_idx[1] is None and mined.neg_idx[0] == [5, 6, 7, 8]


def test_run_prep_fills_when_margin_leaves_nothing(tmp_path, tiny_bert_dir, chunks):
    run = make_run(tmp_path, chunks, make_queries(chunks))
    # abs margin 10: threshold = weakest positive - 10, nothing survives -> all filled at random
    manifest = run_prep(recipe_for(tiny_bert_dir, margin=10.0, margin_type="abs", negatives_used=3), run)
    assert manifest.counts["mined_negatives"] == 0
    doc_of = {c.id: c.doc_id for c in chunks}
    for ex in read_rows(run.path("prep", "train.jsonl"), TrainExample):
        assert len(ex.neg_ids) == 3 and len(ex.neg_scores) == 3
        pos_docs = {doc_of[p] for p in ex.pos_ids}
        assert not {doc_of[n] for n in ex.neg_ids} & pos_docs  # exclude_same_document holds for fills too


# ------------------------------------------------------------------------------------------ files


def test_both_training_formats_round_trip(tmp_path):
    examples = [
        TrainExample(query="what is a comet", pos_doc=["Comets orbit.", "Ice tails."], neg_doc=["Bonds pay."],
                     query_id="q0", pos_ids=["a#0", "a#1"], neg_ids=["f#0"], pos_scores=[0.9, 0.8],
                     neg_scores=[0.3]),
        TrainExample(query="dough", pos_doc=["Knead dough."], neg_doc=["Comets orbit.", "Sails up."],
                     query_id="q1", pos_ids=["c#0"], neg_ids=["a#0", "s#0"], pos_scores=[0.7],
                     neg_scores=[0.2, 0.1]),
    ]
    write_inline(tmp_path / "train.jsonl", examples)
    write_automodel(tmp_path, examples)
    inline = read_training(tmp_path / "train.jsonl")
    auto = read_training(tmp_path / "train.automodel.json")
    expected = [(e.query_id, e.query, tuple(e.pos_doc), tuple(e.neg_doc)) for e in examples]
    assert [(r.query_id, r.query, r.pos_doc, r.neg_doc) for r in inline] == expected
    assert [(r.query_id, r.query, r.pos_doc, r.neg_doc) for r in auto] == expected
    spec = json.loads((tmp_path / "train.automodel.json").read_text())
    assert spec["corpus"] == [{"path": "./corpus/"}]
    assert spec["data"][1]["neg_doc"][0] == {"id": doc_id("Comets orbit.")}
    assert doc_id("Comets orbit.").startswith("d_") and len(doc_id("x")) == 18
    meta = read_json(tmp_path / "corpus" / "merlin_metadata.json")
    assert meta == {"corpus_id": spec["data"][0]["corpus_id"], "class": "TextQADataset"}
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "corpus" / "train.parquet")
    assert table.column_names == ["id", "text"] and table.num_rows == 5  # "Comets orbit." stored once


def test_inline_reader_accepts_nemo_plain_rows(tmp_path):
    path = tmp_path / "plain.jsonl"
    write_jsonl(path, [{"query": "q", "pos_doc": "p", "neg_doc": ["n1", "n2"]}])
    (rec,) = read_training(path)
    assert rec.pos_doc == ("p",) and rec.neg_doc == ("n1", "n2") and rec.query_id == "1"


def test_eval_files_are_valid_consistent_beir(prepared, chunks):
    import pytrec_eval

    run, _, manifest = prepared
    eval_dir = run.path("prep", "eval")
    corpus = list(read_jsonl(eval_dir / "corpus.jsonl"))
    queries = list(read_jsonl(eval_dir / "queries.jsonl"))
    lines = (eval_dir / "qrels" / "test.tsv").read_text().splitlines()
    assert lines[0] == "query-id\tcorpus-id\tscore"
    assert [d["_id"] for d in corpus] == [c.id for c in chunks] and set(corpus[0]) == {"_id", "title", "text"}
    assert len(queries) == manifest.counts["test_queries"]
    qrels: dict[str, dict[str, int]] = {}
    for line in lines[1:]:
        qid, cid, score = line.split("\t")
        qrels.setdefault(qid, {})[cid] = int(score)
    by_id = {q["_id"]: q for q in make_queries(chunks)}
    assert set(qrels) == {q["_id"] for q in queries}
    for qid, rels in qrels.items():
        assert set(rels) == set(by_id[qid]["positive_ids"])
    # pytrec_eval accepts the qrels: a run that returns exactly the positives scores nDCG 1
    perfect = {qid: {cid: 1.0 for cid in rels} for qid, rels in qrels.items()}
    res = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg"}).evaluate(perfect)
    assert all(v["ndcg"] == pytest.approx(1.0) for v in res.values())


def test_manifest_reports_score_distributions(prepared):
    run, _, manifest = prepared
    scores = manifest.metrics["scores"]
    train = list(read_rows(run.path("prep", "train.jsonl"), TrainExample))
    assert scores["positives"]["count"] == sum(len(e.pos_scores) for e in train)
    assert scores["negatives"]["count"] == sum(len(e.neg_scores) for e in train)
    neg = [s for e in train for s in e.neg_scores]
    assert scores["negatives"]["max"] == pytest.approx(max(neg))
    assert "| positives |" in run.path("prep", "report.md").read_text()
    assert run.path("prep", "scores.png").stat().st_size > 0


def test_full_run_mines_the_best_candidates_below_the_margin(prepared, chunks):
    """Brute force with the same model: the kept negatives are exactly the top survivors of the rule."""
    from embedtune.models import encode_passages, encode_queries, load_model

    run, recipe, manifest = prepared
    cfg = recipe.prep
    assert manifest.counts["mined_negatives"] > 0 and manifest.counts["random_negatives"] == 0
    train_docs = set(read_json(run.path("prep", "split.json"))["train_documents"])
    pool = [c for c in chunks if c.doc_id in train_docs]
    model = load_model(recipe.model)
    p_emb = encode_passages(model, [c.passage for c in pool])  # title + text, as eval and the index embed
    examples = list(read_rows(run.path("prep", "train.jsonl"), TrainExample))
    q_emb = encode_queries(model, [e.query for e in examples])
    for ex, q in zip(examples, q_emb, strict=True):
        scores = dict(zip([c.id for c in pool], (p_emb @ q).tolist(), strict=True))
        assert ex.pos_scores == pytest.approx([scores[p] for p in ex.pos_ids], abs=1e-5)
        threshold = cfg.margin * min(scores[p] for p in ex.pos_ids)
        pos_docs = {c.doc_id for c in pool if c.id in ex.pos_ids}
        survivors = sorted((s, cid) for cid, s in scores.items() if s < threshold
                           and cid not in ex.pos_ids and cid.split("#")[0] not in pos_docs)
        expected = [cid for _, cid in reversed(survivors)][: cfg.hard_negatives_to_mine]
        assert ex.neg_ids == expected
        assert ex.neg_scores == pytest.approx([scores[n] for n in ex.neg_ids], abs=1e-5)


def test_training_rows_hold_the_passages_eval_and_the_index_embed(prepared, chunks):
    """pos_doc/neg_doc are title + text (schemas.passage_text), not the bare text: a model trained on one
    and scored (eval's BEIR corpus) and deployed (the index) on the other learns the wrong input."""
    run, _, _ = prepared
    by_id = {c.id: c for c in chunks}
    assert all(c.title for c in chunks)
    for ex in read_rows(run.path("prep", "train.jsonl"), TrainExample):
        assert ex.pos_doc == [by_id[i].passage for i in ex.pos_ids]
        assert ex.neg_doc == [by_id[i].passage for i in ex.neg_ids]
        assert ex.pos_doc[0].startswith(by_id[ex.pos_ids[0]].title + " ")


def test_hybrid_teacher_mines_and_scores_with_the_fused_scores(tmp_path, tiny_bert_dir, chunks):
    """teacher=hybrid: recorded scores are fuse(dense, BM25) over the pool, negatives its top survivors."""
    from embedtune.models import encode_passages, encode_queries, load_model
    from embedtune.retrieval.bm25 import BM25Index
    from embedtune.retrieval.fusion import fuse

    run = make_run(tmp_path, chunks, make_queries(chunks))
    recipe = recipe_for(tiny_bert_dir, test_ratio=0.25, fill_missing="drop", negatives_used=1, bm25_weight=0.5)
    assert recipe.prep.teacher == "hybrid"  # the default
    run_prep(recipe, run)
    train_docs = set(read_json(run.path("prep", "split.json"))["train_documents"])
    pool = [c for c in chunks if c.doc_id in train_docs]
    model = load_model(recipe.model)
    examples = list(read_rows(run.path("prep", "train.jsonl"), TrainExample))
    dense = torch.from_numpy(encode_queries(model, [e.query for e in examples])
                             @ encode_passages(model, [c.passage for c in pool]).T)
    lexical = torch.from_numpy(BM25Index([c.passage for c in pool]).scores([e.query for e in examples]))
    fused = fuse(dense, lexical, 0.5)
    assert not torch.allclose(fused, dense, atol=1e-3)  # BM25 really changed the scores
    ids = [c.id for c in pool]
    for row, ex in zip(fused.tolist(), examples, strict=True):
        scores = dict(zip(ids, row, strict=True))
        assert ex.pos_scores == pytest.approx([scores[p] for p in ex.pos_ids], abs=1e-4)
        threshold = recipe.prep.margin * min(scores[p] for p in ex.pos_ids)
        pos_docs = {c.doc_id for c in pool if c.id in ex.pos_ids}
        survivors = sorted((s, cid) for cid, s in scores.items() if s < threshold
                           and cid not in ex.pos_ids and cid.split("#")[0] not in pos_docs)
        assert ex.neg_ids == [cid for _, cid in reversed(survivors)][: recipe.prep.hard_negatives_to_mine]


def test_fuse_ranks_like_z_score_fusion_in_dense_units():
    from embedtune.retrieval.fusion import fuse

    rng = np.random.default_rng(0)
    dense = torch.from_numpy(rng.uniform(0.1, 0.8, size=(3, 50)).astype(np.float32))
    lexical = torch.from_numpy(rng.gamma(1.0, 3.0, size=(3, 50)).astype(np.float32))
    fused = fuse(dense, lexical, 0.3)

    def z(x):
        return (x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)

    assert torch.equal(fused.argsort(1), (0.7 * z(dense) + 0.3 * z(lexical)).argsort(1))
    assert torch.allclose(fused.mean(1), dense.mean(1), atol=1e-5)  # still cosine-like units
    assert torch.allclose(fuse(dense, lexical, 0.0), dense)
    # a query sharing no term with any candidate (all-zero BM25 row) keeps its dense scores
    assert torch.allclose(fuse(dense, torch.zeros_like(lexical), 0.5), dense)


def test_hybrid_teacher_falls_back_to_dense_for_unspaced_languages(caplog):
    from embedtune.prep.teacher import make_teacher
    from embedtune.retrieval.fusion import HybridRescorer

    assert make_teacher("hybrid", ["查询"], ["段落一", "段落二"], 0.5, "zh") is None
    assert "BM25 cannot split" in caplog.text
    assert make_teacher("dense", ["q"], ["p"], 0.5, "en") is None
    assert isinstance(make_teacher("hybrid", ["Hafen"], ["der Hafen von Hamburg"], 0.5, "de"), HybridRescorer)


# ------------------------------------------------------------------------------------------ errors, resume


def test_unknown_positive_id_names_file_line_and_query(tmp_path, tiny_bert_dir, chunks):
    queries = make_queries(chunks)
    queries[2]["positive_ids"] = ["no-such-chunk"]
    run = make_run(tmp_path, chunks, queries)
    with pytest.raises(ArtifactError, match=r"queries\.jsonl:3: query 'q-.*' .*no-such-chunk"):
        run_prep(recipe_for(tiny_bert_dir), run)


def test_empty_query_text_is_an_error(tmp_path, tiny_bert_dir, chunks):
    queries = make_queries(chunks)
    queries[0]["text"] = "  "
    run = make_run(tmp_path, chunks, queries)
    with pytest.raises(ArtifactError, match=r"queries\.jsonl:1: .*empty text"):
        run_prep(recipe_for(tiny_bert_dir), run)


def test_missing_sdg_stage_is_named(tmp_path, tiny_bert_dir, chunks):
    run = RunDir(tmp_path)
    write_stage(run, "corpus", "chunks.jsonl", chunks)
    with pytest.raises(ArtifactError, match="stage 'sdg' has not completed"):
        run_prep(recipe_for(tiny_bert_dir), run)


def test_rerun_skips_and_force_reruns(prepared):
    run, recipe, first = prepared
    again = run_prep(recipe, run)
    assert again.skipped and again.finished_at == first.finished_at
    forced = run_prep(recipe, run, force=True)
    assert not forced.skipped and forced.outputs == first.outputs  # deterministic


def test_cli_audit_prints_sample(prepared):
    from typer.testing import CliRunner

    from embedtune.cli import app

    run, recipe, _ = prepared
    # the same recipe as the fixture's, so the stage is up to date and only the audit runs
    sets = [f"model.name={recipe.model.name}"]
    sets += [f"prep.{k}={v}" for k, v in recipe.prep.model_dump().items() if v is not None]
    args = ["prep", "--run-dir", str(run.root), "--audit", "2"]
    result = CliRunner().invoke(app, args + [x for kv in sets for x in ("-o", kv)])
    assert result.exit_code == 0, result.output
    train_ids = [e.query_id for e in read_rows(run.path("prep", "train.jsonl"), TrainExample)]
    shown = [qid for qid in train_ids if qid in result.output]
    assert len(shown) == 2 and "neg" in result.output and "up to date" in result.output


# ------------------------------------------------------------------------------------------ real data


@pytest.mark.slow
def test_scifact_subset_with_the_shipped_model(tmp_path, shared_data):
    """Human SciFact claims and abstracts, the default model: no leakage, and positives outscore negatives."""
    scifact = shared_data / "scifact"
    qrels: dict[str, list[str]] = {}
    for line in (scifact / "qrels" / "test.tsv").read_text().splitlines()[1:]:
        qid, cid, _ = line.split("\t")
        qrels.setdefault(qid, []).append(cid)
    qids = sorted(qrels)[:60]
    needed = {c for q in qids for c in qrels[q]}
    docs = list(read_jsonl(scifact / "corpus.jsonl"))
    extra = [d["_id"] for d in docs[:400] if d["_id"] not in needed][: 200 - len(needed)]
    keep = needed | set(extra)
    chunks = [Chunk(_id=f"{d['_id']}#0", doc_id=d["_id"], title=d["title"], text=d["text"])
              for d in docs if d["_id"] in keep]
    texts = {q["_id"]: q["text"] for q in read_jsonl(scifact / "queries.jsonl")}
    queries = [{"_id": q, "text": texts[q], "positive_ids": [f"{c}#0" for c in qrels[q]],
                "generator": {"kind": "human"}} for q in qids]
    run = make_run(tmp_path, chunks, queries)
    recipe = Recipe(prep={"fill_missing": "drop", "mining_query_block": 16})
    manifest = run_prep(recipe, run)
    scores = manifest.metrics["scores"]
    assert scores["positives"]["median"] > scores["negatives"]["median"]
    split = read_json(run.path("prep", "split.json"))
    test_docs = set(split["test_documents"])
    for ex in read_rows(run.path("prep", "train.jsonl"), TrainExample):
        assert not {p.split("#")[0] for p in ex.pos_ids + ex.neg_ids} & test_docs
        assert all(s < 0.95 * min(ex.pos_scores) + 1e-6 for s in ex.neg_scores)
    assert manifest.counts["test_queries"] == len(split["test_queries"]) > 0


def test_the_scores_are_named_after_the_teacher_that_made_them():
    from embedtune.prep.teacher import score_label

    assert score_label("hybrid", 0.5, "en").startswith("hybrid teacher score") and "0.5" in score_label(
        "hybrid", 0.5, "en")
    assert score_label("dense", 0.5, "en") == score_label("hybrid", 0.0, "en") == "base-model cosine"
    assert score_label("hybrid", 0.5, "zh") == "base-model cosine"  # BM25 cannot split unspaced scripts
