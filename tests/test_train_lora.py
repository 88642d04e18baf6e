"""LoRA in the memory plan: only the adapters carry gradients and AdamW state."""

from __future__ import annotations

from embedtune.config import LoraConfig
from embedtune.models import load_model
from embedtune.train.lora import add_lora, target_modules
from embedtune.train.machine import Hardware
from embedtune.train.memory import memory_budget, parameter_state_bytes

CPU = Hardware(False, False, False, "adamw_torch")


def test_lora_charges_optimizer_state_to_the_adapters_only(tiny_llama_dir, monkeypatch):
    from embedtune.train import machine

    monkeypatch.setattr(machine, "free_memory", lambda hw: 10_000_000_000)
    model = load_model(str(tiny_llama_dir))
    total = sum(p.numel() for p in model.parameters())
    assert parameter_state_bytes(model) == 16 * total  # full fine-tune: weight, gradient, two AdamW moments
    full = memory_budget(model, 2, CPU)
    add_lora(model, LoraConfig())
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert adapters and {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n}
    # rank 16 on every attention and MLP projection of the 2 layers: r * (in + out) each
    cfg = model[0].auto_model.config
    kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    h, f = cfg.hidden_size, cfg.intermediate_size
    per_layer = 16 * ((h + h) * 2 + (h + kv) * 2 + (h + f) * 2 + (f + h))
    assert target_modules(model, LoraConfig()) == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                   "down_proj"]
    assert adapters == per_layer * cfg.num_hidden_layers
    assert parameter_state_bytes(model) == 16 * adapters + 4 * total
    assert memory_budget(model, 2, CPU).available == full.available + 16 * total - 16 * adapters - 4 * total
