"""Llama-family decoders as bidirectional encoders: non-causal attention that survives save and reload."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from _train_helpers import make_run, synthetic_examples, tiny_recipe
from embedtune.models import load_model
from embedtune.models.bidirectional import is_bidirectional

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
def test_finetuned_llama_reloads_bidirectional(tmp_path, tiny_llama_dir, finetuning_type):
    from sentence_transformers import SentenceTransformer

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


def run_finetune_and_check(recipe, run):
    from embedtune.train import run_finetune

    return run_finetune(recipe, run)
