"""Finetune decisions that need no model: batch scaling, Matryoshka dims, input checks, dataset building."""

from __future__ import annotations

import json
import logging

import pytest

from _train_helpers import synthetic_examples
from embedtune.artifacts import ArtifactError
from embedtune.config import FinetuneConfig
from embedtune.train.data import load_examples, prepare, to_dataset
from embedtune.train.machine import Hardware
from embedtune.train.matryoshka import matryoshka_dims
from embedtune.train.memory import MemoryBudget, activation_bytes, memory_budget
from embedtune.train.plan import plan_batches


@pytest.mark.parametrize(
    ("dim", "expected"),
    [
        (384, [384, 256, 128, 64]),
        (768, [768, 512, 384, 256, 128]),
        (1024, [1024, 768, 512, 384, 256]),
        (2048, [2048, 1024, 768, 512, 384]),
        (32, None),  # tiny models: nothing worth truncating to
    ],
)
def test_matryoshka_auto_rule(dim, expected):
    assert matryoshka_dims("auto", dim) == expected


def test_matryoshka_explicit_list_adds_full_size_and_rejects_too_large():
    assert matryoshka_dims([16, 8], 32) == [32, 16, 8]
    assert matryoshka_dims(None, 384) is None
    with pytest.raises(ValueError, match="matryoshka_dims"):
        matryoshka_dims([512], 384)


@pytest.mark.parametrize(("n", "batch"), [(100, 16), (300, 37), (1000, 64), (1999, 64), (5000, 128)])
def test_small_data_batch_scaling(n, batch):
    assert plan_batches(FinetuneConfig(), n).global_batch == batch


def test_small_data_scaling_never_raises_a_batch_the_recipe_set_lower():
    assert plan_batches(FinetuneConfig(global_batch_size=32), 745).global_batch == 32
    assert plan_batches(FinetuneConfig(global_batch_size=32), 745).steps_per_epoch == 24
    assert plan_batches(FinetuneConfig(global_batch_size=64), 745).scaled is False


def test_batch_scaling_can_be_switched_off_and_never_exceeds_the_data():
    assert plan_batches(FinetuneConfig(auto_scale_batch=False), 500).global_batch == 128
    assert plan_batches(FinetuneConfig(auto_scale_batch=False), 20).global_batch == 20


def test_batch_splits_across_ranks_and_picks_cached_loss_for_micro_batches():
    plan = plan_batches(FinetuneConfig(micro_batch_size=8), 5000, world_size=2)
    assert (plan.global_batch, plan.per_device, plan.loss, plan.mini_batch) == (128, 64, "cached_mnrl", 8)
    assert plan_batches(FinetuneConfig(), 5000).loss == "mnrl"


def test_a_batch_whose_activations_do_not_fit_is_split_into_gradcache_mini_batches(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="embedtune")
    monkeypatch.setattr(logging.getLogger("embedtune"), "propagate", True)
    # 64 examples x 2 passages x 100 MB = 12.8 GB of activations, 5 GB free: 25 examples fit at a time.
    tight = MemoryBudget(bytes_per_text=100_000_000, texts_per_example=2, available=5_000_000_000)
    plan = plan_batches(FinetuneConfig(), 1000, memory=tight)
    assert (plan.global_batch, plan.loss, plan.mini_batch) == (64, "cached_mnrl", 25)
    assert "12.8 GB of activations" in caplog.text
    roomy = MemoryBudget(bytes_per_text=100_000_000, texts_per_example=2, available=50_000_000_000)
    assert plan_batches(FinetuneConfig(), 1000, memory=roomy).loss == "mnrl"
    # An explicit choice is the user's: kept, with a warning.
    kept = plan_batches(FinetuneConfig(loss="mnrl"), 1000, memory=tight)
    assert (kept.loss, kept.mini_batch) == ("mnrl", None) and "may run out of memory" in caplog.text
    assert plan_batches(FinetuneConfig(micro_batch_size=8), 1000, memory=tight).mini_batch == 8


def test_activation_estimate_matches_what_ran_and_what_was_killed_here():
    """multilingual-e5-small, 512 tokens, 29 x 2 passages was OOM-killed on 24 GB; MiniLM-L6, 256 tokens,
    64 x 2 passages trained (bench/domain_adaptation.py runs)."""
    assert 24e9 < 58 * activation_bytes(512, 384, 12, 12) < 40e9
    assert 5e9 < 128 * activation_bytes(256, 384, 12, 6) < 0.7 * 20e9


def test_memory_budget_reads_the_models_shape(tiny_bert_dir, monkeypatch):
    from embedtune.models import load_model
    from embedtune.train import machine

    model = load_model(str(tiny_bert_dir))
    monkeypatch.setattr(machine, "free_memory", lambda hw: 10_000_000_000)
    budget = memory_budget(model, 3, Hardware(False, False, False, "adamw_torch"))
    cfg = model[0].auto_model.config
    assert budget.bytes_per_text == activation_bytes(model.max_seq_length, cfg.hidden_size,
                                                     cfg.num_attention_heads, cfg.num_hidden_layers)
    params = sum(p.numel() for p in model.parameters())
    assert budget.available == 7_000_000_000 - 16 * params and budget.texts_per_example == 3
    # Two CPU ranks on one machine share its RAM.
    shared = memory_budget(model, 3, Hardware(False, False, False, "adamw_torch"), world_size=2)
    assert shared.available == 3_500_000_000 - 16 * params


def test_few_steps_warns(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="embedtune")
    monkeypatch.setattr(logging.getLogger("embedtune"), "propagate", True)
    plan = plan_batches(FinetuneConfig(epochs=1), 100)
    assert plan.total_steps == 7
    assert "only 7 optimizer steps" in caplog.text


def test_empty_training_file_is_a_clear_error(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("")
    with pytest.raises(ArtifactError, match="no training examples"):
        load_examples(path)


def test_malformed_training_rows_name_file_and_line(tmp_path):
    good = json.dumps(synthetic_examples(1)[0])
    path = tmp_path / "train.jsonl"
    path.write_text(good + "\n{not json\n")
    with pytest.raises(ArtifactError, match=r"train.jsonl:2: malformed JSON"):
        load_examples(path)
    row = synthetic_examples(1)[0] | {"pos_doc": []}
    path.write_text(good + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ArtifactError, match=r"train.jsonl:2: pos_doc"):
        load_examples(path)
    path.write_text(json.dumps({"query": "q"}) + "\n")
    with pytest.raises(ArtifactError, match=r"train.jsonl:1: pos_doc"):
        load_examples(path)


def test_validation_is_split_by_query_with_distractors(tmp_path):
    from embedtune.schemas import TrainExample

    rows = [TrainExample.model_validate(r) for r in synthetic_examples(40)]
    data = prepare(rows, negatives=4, val_fraction=0.1, val_corpus=10, seed=1)
    train_ids = {ex.query_id for ex in data.train}
    assert len(data.validation.queries) == 4
    assert not train_ids & set(data.validation.queries)
    for qid, relevant in data.validation.relevant.items():
        assert relevant <= set(data.validation.corpus), qid
    # held-out positives + their 4 negatives + 10 other passages
    assert len(data.validation.corpus) == 4 * 5 + 10


def test_short_negative_lists_are_filled_without_the_rows_own_positive():
    from embedtune.schemas import TrainExample

    rows = [TrainExample.model_validate(r) for r in synthetic_examples(10, negatives=4)]
    rows[0] = rows[0].model_copy(update={"neg_doc": rows[0].neg_doc[:1], "neg_ids": rows[0].neg_ids[:1]})
    data = prepare(rows, negatives=4, val_fraction=0.0, val_corpus=0, seed=0)
    assert data.filled_negatives == 1
    ds = to_dataset(data.train, 4, seed=0)
    assert ds.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "negative_4"]
    first = ds[0]
    negs = [first[f"negative_{i}"] for i in range(1, 5)]
    assert negs[0] == rows[0].neg_doc[0]
    assert rows[0].pos_doc[0] not in negs and len(set(negs)) == 4


def saved_activation_bytes(model, features) -> int:
    """Bytes autograd keeps for backward in one forward pass: every tensor a backward node saves, counted once per
    storage, the model's own parameters left out (they are resident anyway)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(features)["sentence_embedding"].sum()
    return sum(saved.values())


@pytest.mark.parametrize(
    ("training", "attention"),
    [("all_weights", "sdpa"), ("lora", "sdpa"), ("lora_no_dropout", "sdpa"), ("all_weights", "eager"),
     ("lora", "eager")],
)
def test_decoder_activation_estimate_matches_what_autograd_saves(tiny_llama_dir, training, attention):
    """The Llama term by term count (norms, gated MLP, grouped-query attention, LoRA's dropout copies) against the
    tensors a tiny random Llama really keeps for backward, within 5 %."""
    import torch

    from embedtune.config import LoraConfig
    from embedtune.models import load_model
    from embedtune.train.lora import add_lora
    from embedtune.train.memory import decoder_activation_bytes

    model = load_model(str(tiny_llama_dir))
    auto_model = model[0].auto_model
    auto_model.set_attn_implementation(attention)
    if training != "all_weights":
        add_lora(model, LoraConfig(dropout=0.1 if training == "lora" else 0.0))
    model.train()
    batch, seq = 4, 48
    features = {"input_ids": torch.randint(5, 1000, (batch, seq)),
                "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    measured = saved_activation_bytes(model, features)
    planned = batch * decoder_activation_bytes(auto_model, seq)
    assert planned == pytest.approx(measured, rel=0.05)


def test_decoder_estimate_grows_with_what_the_config_says(tiny_llama_dir):
    """Eager attention adds the softmax's n*s per token (quadratic in the sequence); SDPA does not."""
    from embedtune.models import load_model
    from embedtune.train.memory import decoder_activation_bytes

    auto_model = load_model(str(tiny_llama_dir))[0].auto_model
    auto_model.set_attn_implementation("sdpa")
    assert decoder_activation_bytes(auto_model, 64) == 2 * decoder_activation_bytes(auto_model, 32)
    auto_model.set_attn_implementation("eager")
    assert decoder_activation_bytes(auto_model, 64) > 2 * decoder_activation_bytes(auto_model, 32)


def test_encoders_keep_the_encoder_formula(tiny_bert_dir):
    from embedtune.models import load_model
    from embedtune.train.memory import decoder_activation_bytes

    assert decoder_activation_bytes(load_model(str(tiny_bert_dir))[0].auto_model, 64) is None


def test_queries_are_counted_at_their_typical_length(tiny_llama_dir, monkeypatch):
    from embedtune.models import load_model
    from embedtune.train import machine
    from embedtune.train.memory import decoder_activation_bytes, typical_query_tokens

    monkeypatch.setattr(machine, "free_memory", lambda hw: 10_000_000_000)
    model = load_model(str(tiny_llama_dir))
    queries = ["short one"] * 19 + [" ".join(["word"] * 500)]  # one very long query: past the max length
    tokens = typical_query_tokens(model, queries)
    prompted = len(model.tokenizer("query: short one")["input_ids"])
    assert tokens == prompted  # the 95th percentile of 20: not the outlier
    assert typical_query_tokens(model, [" ".join(["word"] * 500)] * 3) == model.max_seq_length
    cpu = Hardware(False, False, False, "adamw_torch")
    budget = memory_budget(model, 2, cpu, query_tokens=tokens)
    auto_model = model[0].auto_model
    assert budget.bytes_per_query == decoder_activation_bytes(auto_model, tokens)
    assert budget.activations(3) == 3 * (2 * budget.bytes_per_text + budget.bytes_per_query)
    assert memory_budget(model, 2, cpu).bytes_per_query == 0


@pytest.mark.parametrize(
    ("native", "setting", "expected"),
    [(True, None, True), (False, None, False), (True, False, False), (False, True, True)],
)
def test_cpu_training_uses_bf16_where_the_cpu_multiplies_it_natively_unless_told(monkeypatch, native, setting,
                                                                                   expected):
    import torch

    from embedtune.train import machine

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine, "cpu_has_native_bf16", lambda: native)
    hw = machine.hardware(setting)
    assert hw.bf16 is expected
    assert not hw.cuda and not hw.tf32 and hw.optim == "adamw_torch"


def test_attention_dropout_is_set_on_the_live_layers_and_frees_the_attention_scores(tiny_bert_dir, tiny_llama_dir):
    """BERT's self-attention dropout module and Llama's attention_dropout float are both found and set; fused
    SDPA without dropout keeps no attention probabilities for backward, so the planner counts less."""
    from embedtune.models import load_model
    from embedtune.train.dropout import attention_dropout_layers, set_attention_dropout
    from embedtune.train.memory import keeps_attention_scores

    bert = load_model(str(tiny_bert_dir))
    layers = attention_dropout_layers(bert)
    assert len(layers) == 2 and all(m.dropout.p == pytest.approx(0.1) for m, _ in layers)  # BERT's default
    auto_model = bert[0].auto_model
    sdpa = auto_model.config._attn_implementation == "sdpa"
    assert keeps_attention_scores(auto_model)  # dropout on the probabilities: no fused kernel
    cpu = Hardware(False, False, False, "adamw_torch")
    before = memory_budget(bert, 2, cpu)
    assert set_attention_dropout(bert, 0.0) == 2
    assert all(m.dropout.p == 0.0 for m, _ in layers)
    assert keeps_attention_scores(auto_model) is not sdpa
    if sdpa:
        assert memory_budget(bert, 2, cpu).bytes_per_text < before.bytes_per_text

    llama = load_model(str(tiny_llama_dir))
    llama_layers = attention_dropout_layers(llama)
    assert len(llama_layers) == 2 and {attr for _, attr in llama_layers} == {"attention_dropout"}
    set_attention_dropout(llama, 0.25)
    assert all(m.attention_dropout == 0.25 for m, _ in llama_layers)


def test_activation_formula_drops_the_attention_term_without_scores():
    with_scores = activation_bytes(256, 384, 12, 6)
    without = activation_bytes(256, 384, 12, 6, attention_scores=False)
    assert without / with_scores == pytest.approx(34 / (34 + 5 * 12 * 256 / 384))
