"""Attention-probability dropout on a loaded model: where each architecture keeps it, and setting it for training."""

from __future__ import annotations

from typing import Any


def attention_dropout_layers(model) -> list[tuple[Any, str]]:
    """(module, attribute) of every attention-probability dropout: BERT-family self-attention's ``dropout``
    (an ``nn.Dropout``) and the ``attention_dropout`` float of Llama-style attention."""
    import torch

    found = []
    for module in model.modules():
        if isinstance(getattr(module, "attention_dropout", None), float):
            found.append((module, "attention_dropout"))
        elif type(module).__name__.endswith("SelfAttention") and isinstance(getattr(module, "dropout", None),
                                                                              torch.nn.Dropout):
            found.append((module, "dropout"))
    return found


def set_attention_dropout(model, p: float) -> int:
    """Sets the attention-probability dropout of ``model``'s live modules (its saved config is left as it was);
    returns how many layers it changed."""
    layers = attention_dropout_layers(model)
    for module, attr in layers:
        setattr(*rate_slot(module, attr), p)
    return len(layers)


def rate_slot(module, attr: str) -> tuple[Any, str]:
    """Where a layer found by :func:`attention_dropout_layers` keeps its rate: the Dropout's ``p``, or the float."""
    return (module.dropout, "p") if attr == "dropout" else (module, attr)
