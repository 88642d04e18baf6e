"""The model card names the base model and its licence from the base folder's own card."""

from __future__ import annotations

import yaml

from embedtune.train.card import base_facts, model_card

BASE_CARD = "---\nlanguage: en\nlicense: apache-2.0\nlibrary_name: sentence-transformers\n---\n\n# all-MiniLM-L6-v2\n"


def test_card_carries_base_model_licence_data_recipe_and_validation(tmp_path):
    (tmp_path / "README.md").write_text(BASE_CARD)
    base = base_facts(tmp_path, "default")
    assert base == {"name": "all-MiniLM-L6-v2", "license": "apache-2.0", "language": "en", "hub_id": None}
    counts = {"examples": 120, "train_examples": 100, "val_queries": 20, "negatives": 4, "filled_negatives": 0,
              "loss": "mnrl", "steps": 30, "epochs": 3.0, "global_batch_size": 16}
    metrics = {"base_val_ndcg@10": 0.51234, "best_val_ndcg@10": 0.61234, "best_step": 20, "precision": "fp32",
               "matryoshka_dims": [384, 128]}
    recipe = {"finetune": {"finetuning_type": "all_weights", "learning_rate": 1e-5, "temperature": 0.02, "seed": 42}}
    card = model_card(base, recipe, counts, metrics, "demo")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["license"] == "apache-2.0" and front["language"] == "en" and "embedtune" in front["tags"]
    assert "from **all-MiniLM-L6-v2**" in card and "Licence: **apache-2.0**" in card
    assert "120 synthetic query-passage examples" in card and "4 mined hard negatives" in card
    assert "| base (all-MiniLM-L6-v2) | 0.5123 |" in card and "| fine-tuned (best step 20) | 0.6123 |" in card
    assert "| learning rate | 1e-05 |" in card and "| Matryoshka dims | [384, 128] |" in card


def test_a_hub_id_becomes_the_base_model_field(tmp_path):
    base = base_facts(tmp_path / "absent", "intfloat/e5-small-v2")
    assert base["hub_id"] == "intfloat/e5-small-v2" and base["license"] is None
    card = model_card(base, {}, {}, {}, "r")
    assert yaml.safe_load(card.split("---\n")[1])["base_model"] == "intfloat/e5-small-v2"
    assert "Licence: **unknown**" in card


def test_tensorboard_reporting_is_off_by_default_and_needs_the_package(tmp_path, monkeypatch):
    import importlib.util

    import pytest

    from embedtune.config import load_recipe
    from embedtune.train import stage

    assert load_recipe().finetune.report_to == "none"
    recipe = load_recipe(None, ["finetune.report_to=tensorboard"])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ValueError, match="needs the tensorboard package: pip install tensorboard"):
        stage.run_finetune(recipe, None)  # type: ignore[arg-type]  # refused before the run is read
