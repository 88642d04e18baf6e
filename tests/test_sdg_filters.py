"""Unit tests of the sdg filters, JSON parsing, the response cache and question allocation."""

from __future__ import annotations

import numpy as np
import pytest

from embedtune.config import SdgConfig
from embedtune.schemas import Chunk
from embedtune.sdg import filters
from embedtune.sdg.cache import ResponseCache, request_key
from embedtune.sdg.llm import allocate, build_units
from embedtune.sdg.parsing import as_list, extract_json

PASSAGE = ("Regular exercise lowers resting blood pressure in adults. In a twelve week trial walkers saw "
           "systolic pressure fall by five points.")


def test_length_counts_words_and_cjk_characters():
    assert filters.check_length("what lowers blood pressure", 3, 10) is None
    assert filters.check_length("blood pressure", 3, 10) == "too_short"
    assert filters.check_length(" ".join(["word"] * 11), 3, 10) == "too_long"
    assert filters.word_count("什么降低血压") == 6  # one word per character without spaces
    assert filters.check_length("血压", 3, 10) == "too_short"


@pytest.mark.parametrize("text", ["", "   ", "???", "12 34 - 56", "def f(x): return x;", "```json {}```",
                                  "Passage: the bridge was closed", "see https://example.org/a"])
def test_not_a_query_rejects_junk(text):
    assert filters.check_is_query(text) == "not_a_query"


@pytest.mark.parametrize("text", ["does walking lower blood pressure", "Wie hoch ist der Blutdruck?",
                                  "什么运动可以降低血压？"])
def test_real_queries_pass_the_query_check(text):
    assert filters.check_is_query(text) is None


def test_copy_overlap_flags_copied_sentences_not_paraphrases():
    copied = "regular exercise lowers resting blood pressure in adults"
    paraphrase = "can walking every day help with hypertension"
    assert filters.copy_overlap(copied, PASSAGE) == 1.0
    assert filters.copy_overlap(paraphrase, PASSAGE) < 0.2
    assert filters.check_copied(copied, [PASSAGE], 0.8) == "copied_from_passage"
    assert filters.check_copied(paraphrase, [PASSAGE], 0.8) is None


def test_copy_overlap_uses_character_ngrams_for_chinese():
    passage = "规律的体育锻炼可以降低成年人的静息血压。在为期十二周的试验中，步行者的收缩压下降了五个点。"
    copied = "规律的体育锻炼可以降低成年人的静息血压"
    question = "每天散步对高血压患者有什么好处"
    assert filters.is_spaceless(copied)
    # Word n-grams would see one "word" (no spaces) and miss the copy; character 3-grams catch it.
    assert filters.copy_overlap(copied, passage) == 1.0
    assert filters.copy_overlap(question, passage) < 0.2
    assert filters.check_copied(copied, [passage], 0.8) == "copied_from_passage"


def test_exact_dedup_ignores_case_and_punctuation():
    dedup = filters.ExactDeduper()
    assert dedup.check("What lowers blood pressure?") is None
    assert dedup.check("what lowers  blood pressure") == "duplicate"
    assert dedup.check("what raises blood pressure") is None


def test_near_duplicates_keeps_the_first_of_each_group():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(3, 16))
    rows = np.vstack([base[0], base[0] + 0.01, base[1], base[2], base[1] + 0.01])
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    assert filters.near_duplicates(rows, 0.9).tolist() == [True, False, True, True, False]
    # Across block boundaries too.
    assert filters.near_duplicates(rows, 0.9, block=2).tolist() == [True, False, True, True, False]


def test_roundtrip_rank_of_best_positive():
    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    passages = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    ranks = filters.roundtrip_ranks(queries, passages, [[1], [0, 3]])
    assert ranks.tolist() == [2, 2]  # query 0: passage 1 is second; query 1: passage 3 is second
    assert filters.check_roundtrip(2, top_k=1, min_rank=1) == "roundtrip_miss"
    assert filters.check_roundtrip(1, top_k=20, min_rank=2) == "roundtrip_too_easy"
    assert filters.check_roundtrip(5, top_k=20, min_rank=2) is None


def test_roundtrip_ranks_by_the_rescored_scores_when_given_a_rescorer():
    import torch

    queries = np.array([[1.0, 0.0], [0.0, 1.0]])
    passages = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [0.6, 0.8]])
    seen = []

    def lift_passage_1(start: int, end: int, dense: torch.Tensor) -> torch.Tensor:
        seen.append((start, end))
        return dense + torch.tensor([0.0, 0.5, 0.0, 0.0])

    ranks = filters.roundtrip_ranks(queries, passages, [[1], [0, 3]], block=1, rescore=lift_passage_1)
    assert ranks.tolist() == [1, 3]  # query 0's positive is lifted to the top; query 1's fall behind it
    assert seen == [(0, 1), (1, 2)]  # each block is rescored with its own query rows


@pytest.mark.parametrize(("text", "expected"), [
    ('{"a": 1}', {"a": 1}),
    ('Sure! ```json\n{"pairs": [1, 2]}\n``` hope this helps', {"pairs": [1, 2]}),
    ('Here it is: [{"q": "x"}] and some trailing words {', [{"q": "x"}]),
    ('prefix {not json} then {"ok": true}', {"ok": True}),
    ("no json at all", None),
    ('{"truncated": ', None),
])
def test_extract_json_is_tolerant(text, expected):
    assert extract_json(text) == expected


def test_as_list_unwraps_objects():
    assert as_list([1], "pairs") == [1]
    assert as_list({"pairs": [1]}, "pairs") == [1]
    assert as_list({"questions": [2]}, "pairs") == [2]
    assert as_list({"a": 1}, "pairs") is None


def test_cache_persists_and_counts(tmp_path):
    key = request_key("chat", "m", [{"role": "user", "content": "hi"}], 0)
    cache = ResponseCache(tmp_path / "c.sqlite")
    assert cache.get(key) is None
    cache.put(key, "hello")
    cache.close()
    again = ResponseCache(tmp_path / "c.sqlite")
    assert again.get(key) == "hello" and again.hits == 1 and len(again) == 1
    assert request_key("chat", "m", [{"role": "user", "content": "hi"}], 1) != key


def test_allocate_sums_to_n():
    assert allocate(5, {"a": 0.5, "b": 0.3, "c": 0.2}) == {"a": 3, "b": 1, "c": 1}
    assert sum(allocate(7, {"a": 1, "b": 1, "c": 1}).values()) == 7


def test_units_bundle_neighbouring_chunks_for_multi_hop():
    chunks = [Chunk(_id=f"d1#{i}", doc_id="d1", text=f"t{i}", start=i * 10) for i in range(4)]
    chunks.append(Chunk(_id="d2#0", doc_id="d2", text="solo"))
    sdg = SdgConfig(queries_per_chunk=2, max_hops=3)
    units = build_units(chunks, sdg)
    singles = [u for u in units if len(u.chunks) == 1]
    bundles = [u for u in units if len(u.chunks) > 1]
    assert len(singles) == 5
    assert [[c.id for c in b.chunks] for b in bundles] == [["d1#0", "d1#1", "d1#2"]]  # d1#3 alone: no bundle
    assert all("multi_hop" not in u.mix for u in singles)
    assert bundles[0].mix == {"multi_hop": 1} and bundles[0].min_hops == 2
    solo = next(u for u in singles if u.chunks[0].doc_id == "d2")
    assert sum(solo.mix.values()) == 2  # a one-chunk document gets the full quota as single-hop questions


def test_generated_prose_is_not_a_query():
    assert filters.check_is_query("The sun. The sun heats the earth, making it warm.") == "multi_sentence"
    assert filters.check_is_query("what heats the earth?") is None
    assert filters.looks_like_question("how do tides form") and filters.looks_like_question("tides?")
    assert not filters.looks_like_question("money can only pay their money")
