"""The training loss (+ Matryoshka).

- ``mnrl``/``cached_mnrl``: InfoNCE over 1 positive + hard negatives + in-batch negatives (NVIDIA's recipe).
- ``margin_mse``: the student's score margins (positive minus each hard negative) regress onto prep's teacher
  margins (GPL, Wang et al. 2022). Graded targets instead of "the positive wins": a negative the teacher
  finds nearly as good is pushed away only a little, and a mislabeled positive costs little.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedtune.train.plan import BatchPlan

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from torch import nn


def build_loss(
    model: SentenceTransformer, plan: BatchPlan, temperature: float, dims: list[int] | None
) -> nn.Module:
    """MNRL (or its GradCache twin: scale = 1/temperature, negatives gathered across ranks under DDP) or
    MarginMSE, wrapped in MatryoshkaLoss when ``dims`` are given."""
    from sentence_transformers.sentence_transformer import losses

    common = {"scale": 1.0 / temperature, "gather_across_devices": plan.world_size > 1}
    if plan.loss == "margin_mse":
        loss = losses.MarginMSELoss(model)
    elif plan.loss == "cached_mnrl":
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=plan.mini_batch, **common)
    else:
        loss = losses.MultipleNegativesRankingLoss(model, **common)
    if dims:
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=dims)
    return loss
