"""Recipe: defaults, YAML, overrides, and clear rejection of typos and bad values."""

from __future__ import annotations

import pytest

from embedtune.config import Recipe, RecipeError, dump_recipe, load_recipe


def test_defaults_follow_the_published_recipe():
    r = Recipe()
    assert (r.finetune.epochs, r.finetune.learning_rate, r.finetune.warmup_steps) == (3, 1e-5, 5)
    assert (r.finetune.global_batch_size, r.finetune.temperature, r.finetune.passages_per_query) == (128, 0.02, 5)
    assert (r.prep.hard_negatives_to_mine, r.prep.negatives_used, r.prep.margin) == (5, 4, 0.95)
    assert (r.sdg.dedup_threshold, r.sdg.judge_threshold) == (0.9, 7.0)
    assert r.eval.k_values == [1, 5, 10, 100] and r.export.opset == 17


def test_yaml_and_overrides_apply_in_order(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nfinetune:\n  epochs: 1\n  learning_rate: 3.0e-5\n")
    r = load_recipe(path, ["finetune.epochs=2", "eval.k_values=[1, 10]", "model.name=some/model"])
    assert r.name == "x" and r.finetune.epochs == 2 and r.finetune.learning_rate == 3e-5
    assert r.eval.k_values == [1, 10] and r.model.name == "some/model"


def test_typo_is_rejected_with_closest_name(tmp_path):
    with pytest.raises(RecipeError, match=r"unknown key 'finetune.learning_rte'.*finetune.learning_rate"):
        load_recipe(None, ["finetune.learning_rte=1e-4"])
    path = tmp_path / "r.yaml"
    path.write_text("prepp:\n  seed: 1\n")
    with pytest.raises(RecipeError, match=r"unknown key 'prepp'.*'prep'"):
        load_recipe(path)


def test_bad_value_names_key_and_allowed_values():
    with pytest.raises(RecipeError, match=r"finetune.finetuning_type.*all_weights.*lora_merged"):
        load_recipe(None, ["finetune.finetuning_type=qlora"])
    with pytest.raises(RecipeError, match=r"prep.test_ratio"):
        load_recipe(None, ["prep.test_ratio=1.5"])


@pytest.mark.parametrize(("override", "key"), [
    ("finetune.epochs=.inf", "finetune.epochs"),
    ("finetune.learning_rate=.nan", "finetune.learning_rate"),
    ("sdg.llm.timeout=inf", "sdg.llm.timeout"),  # a string pydantic would read as infinity
    ("prep.margin=1e999", "prep.margin"),  # overflows to infinity
    ("eval.hybrid_bm25_weight=-.inf", "eval.hybrid_bm25_weight"),
])
def test_inf_and_nan_are_refused_with_the_key_named(override, key):
    with pytest.raises(RecipeError, match=rf"'{key}': Input should be a finite number"):
        load_recipe(None, [override])


@pytest.mark.parametrize(("override", "key"), [
    ("finetune.seed=99999999999999999999", "finetune.seed"),  # numpy and torch overflow on it
    ("prep.seed=-1", "prep.seed"),
    ("finetune.epochs=1e12", "finetune.epochs"),
    ("finetune.global_batch_size=10000000000", "finetune.global_batch_size"),
    ("sdg.llm.timeout=1e10", "sdg.llm.timeout"),
    ("sdg.llm.concurrency=100000", "sdg.llm.concurrency"),
    ("serve.max_request_bytes=1099511627776", "serve.max_request_bytes"),
    ("serve.max_request_tokens=0", "serve.max_request_tokens"),
    ("finetune.weight_decay=1e308", "finetune.weight_decay"),  # issue 28 item 9
    ("finetune.temperature=1e-300", "finetune.temperature"),
    ("eval.top_k=1e11", "eval.top_k"),
    ("eval.k_values=[1, 100000000000]", "eval.k_values.1"),
    ("prep.hard_negatives_to_mine=10000000", "prep.hard_negatives_to_mine"),
])
def test_absurd_values_are_refused_with_the_key_named(override, key):
    with pytest.raises(RecipeError, match=rf"'{key}': Input should be"):
        load_recipe(None, [override])


def test_inf_in_a_yaml_recipe_names_the_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("finetune:\n  temperature: .nan\n")
    with pytest.raises(RecipeError, match=r"'finetune.temperature': Input should be a finite number"):
        load_recipe(path)


def test_malformed_override_and_yaml(tmp_path):
    with pytest.raises(RecipeError, match="section.key=value"):
        load_recipe(None, ["finetune.epochs"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune: [1, 2\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="not found"):
        load_recipe(tmp_path / "missing.yaml")


def test_dump_round_trips(tmp_path):
    r = load_recipe(None, ["sdg.queries_per_chunk=3", "corpus.language=de"])
    path = tmp_path / "again.yaml"
    path.write_text(dump_recipe(r))
    assert load_recipe(path) == r
