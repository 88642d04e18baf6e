"""Job bodies in NVIDIA's shapes (NeMo Platform v2 and the older Customizer) map onto the same recipe."""

from __future__ import annotations

import pytest

from embedtune.platform.errors import PlatformError
from embedtune.platform.jobs import CustomizationJobCreate, build_recipe, choose_stages, hyperparameters_of


def recipe_of(body: dict, fmt: str = "corpus", validation: str | None = None) -> dict:
    spec = CustomizationJobCreate.model_validate(body)
    return build_recipe(spec, job_id="cust-1", model_path="/models/base", dataset_format=fmt,
                        dataset_path="/data/docs", validation_path=validation)


V2 = {
    "model": "base", "dataset": {"training": "docs", "validation": "val"},
    "training": {"training_type": "sft", "finetuning_type": "lora", "max_seq_length": 256,
                 "lora": {"rank": 8, "alpha": 16, "dropout": 0.05},
                 "retrieval": {"train_n_passages": 3, "query_prefix": "query: ", "passage_prefix": "passage: "}},
    "schedule": {"epochs": 2, "validation_split": 0.2},
    "batch": {"global_batch_size": 32, "micro_batch_size": 8},
    "optimizer": {"learning_rate": 2e-5, "warmup_steps": 3, "weight_decay": 0.0},
    "output": {"name": "mine"},
}
OLD = {
    "config": "base", "dataset": {"namespace": "team", "name": "docs"}, "output_model": "mine",
    "hyperparameters": {"training_type": "sft", "finetuning_type": "lora_merged", "epochs": 2, "batch_size": 32,
                        "learning_rate": 2e-5, "weight_decay": 0.0,
                        "lora": {"adapter_dim": 8, "adapter_dropout": 0.05}},
}


def test_v2_body_maps_every_field():
    r = recipe_of(V2, validation="/data/val")
    ft = r["finetune"]
    assert ft["finetuning_type"] == "lora_merged"  # NeMo's plain "lora" is served merged here
    assert (ft["epochs"], ft["learning_rate"], ft["weight_decay"], ft["warmup_steps"]) == (2, 2e-5, 0.0, 3)
    assert (ft["global_batch_size"], ft["micro_batch_size"], ft["auto_scale_batch"]) == (32, 8, False)
    assert (ft["lora"]["rank"], ft["lora"]["alpha"], ft["lora"]["dropout"]) == (8, 16, 0.05)
    assert ft["passages_per_query"] == 3 and ft["validation_fraction"] == 0.2
    assert r["model"] == {**r["model"], "name": "/models/base", "max_seq_length": 256, "query_prompt": "query: ",
                          "passage_prompt": "passage: "}
    assert r["corpus"]["path"] == "/data/docs" and r["eval"]["dataset"] == "/data/val" and r["name"] == "cust-1"


def test_older_customizer_body_gives_the_same_finetune_settings():
    old, new = recipe_of(OLD)["finetune"], recipe_of(V2)["finetune"]
    for key in ("finetuning_type", "epochs", "learning_rate", "weight_decay", "global_batch_size",
                "auto_scale_batch"):
        assert old[key] == new[key], key
    assert (old["lora"]["rank"], old["lora"]["dropout"]) == (8, 0.05)
    spec = CustomizationJobCreate.model_validate(OLD)
    assert (spec.base_model, spec.training_dataset, spec.output_name) == ("base", "team/docs", "mine")


def test_recipe_section_reaches_any_key_and_named_fields_win():
    r = recipe_of({"dataset": "docs", "recipe": {"sdg": {"queries_per_chunk": 1}, "finetune": {"epochs": 9}},
                   "hyperparameters": {"epochs": 1}})
    assert r["sdg"]["queries_per_chunk"] == 1 and r["finetune"]["epochs"] == 1
    assert recipe_of({"dataset": "docs"})["finetune"]["auto_scale_batch"] is True  # no batch given: recipe rule


def test_bad_values_are_422_naming_the_key():
    with pytest.raises(PlatformError) as err:
        recipe_of({"dataset": "docs", "recipe": {"finetune": {"epoch": 1}}})
    assert err.value.status == 422 and "finetune.epochs" in err.value.message  # did-you-mean
    with pytest.raises(ValueError, match="unsupported_field"):
        CustomizationJobCreate.model_validate({"dataset": "docs", "training": {"unsupported_field": 1}})


def test_stage_selection():
    assert choose_stages(["corpus"], "corpus", False) == ["corpus"]
    for bad, fmt, msg in ((["prep"], "corpus", "must start at 'corpus'"), (["corpus", "prep"], "corpus", "consecutive"),
                          (["corpus"], "training", "must start at 'finetune'"), (["nope"], "corpus", "unknown")):
        with pytest.raises(PlatformError, match=msg):
            choose_stages(bad, fmt, False)
    assert choose_stages(None, "training", False) == ["finetune"]
    assert choose_stages(None, "training", True) == ["finetune", "eval"]
    assert choose_stages(None, "corpus", False) == ["corpus", "sdg", "prep", "finetune", "eval"]


def test_hyperparameters_for_lineage():
    hp = hyperparameters_of(recipe_of(V2))
    assert hp["finetuning_type"] == "lora_merged" and hp["max_seq_length"] == 256 and hp["lora"]["rank"] == 8
