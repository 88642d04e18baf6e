"""LoRA on the backbone (peft through sentence-transformers' adapter API), merged before saving.

The merged output is a plain model: export and serving take it as is, no adapter files or peft.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedtune.config import LoraConfig

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

# Linear layers to adapt, per transformers ``model_type``: attention projections and the MLP.
TARGETS: dict[str, list[str]] = {
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "xlm-roberta": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "mpnet": ["q", "k", "v", "o", "intermediate.dense", "output.dense"],
    "modernbert": ["Wqkv", "Wo", "Wi"],
    **dict.fromkeys(
        ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2"],
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    ),
}


class LoraTargetError(ValueError):
    """LoRA was asked for an architecture whose target modules are unknown."""


def model_type(model: SentenceTransformer) -> str:
    auto_model = getattr(model[0], "auto_model", None)
    return getattr(getattr(auto_model, "config", None), "model_type", "") or ""


def target_modules(model: SentenceTransformer, cfg: LoraConfig) -> list[str]:
    if cfg.target_modules:
        return list(cfg.target_modules)
    kind = model_type(model)
    if kind not in TARGETS:
        raise LoraTargetError(
            f"no known LoRA target modules for architecture {kind or type(model[0]).__name__!r}; set "
            f"finetune.lora.target_modules (known: {', '.join(sorted(TARGETS))})"
        )
    return TARGETS[kind]


def add_lora(model: SentenceTransformer, cfg: LoraConfig) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType

    model.add_adapter(
        PeftLoraConfig(
            task_type=TaskType.FEATURE_EXTRACTION,
            r=cfg.rank,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=target_modules(model, cfg),
        )
    )


def merge_lora(model: SentenceTransformer) -> None:
    """Fold the LoRA deltas into the base weights and drop the adapter layers, in place."""
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import _get_submodules

    auto_model = model[0].auto_model
    names = [name for name, module in auto_model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name in names:
        parent, layer, child = _get_submodules(auto_model, name)
        layer.merge()
        setattr(parent, child, layer.get_base_layer())
    # transformers' PEFT integration: without these flags save_pretrained writes the full weights again.
    auto_model._hf_peft_config_loaded = False
    if hasattr(auto_model, "peft_config"):
        del auto_model.peft_config
