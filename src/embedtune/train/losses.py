"""The contrastive loss: InfoNCE over 1 positive + hard negatives + in-batch negatives (+ Matryoshka)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from embedtune.train.plan import BatchPlan

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from torch import nn


def build_loss(
    model: SentenceTransformer, plan: BatchPlan, temperature: float, dims: list[int] | None
) -> nn.Module:
    """MNRL (or its GradCache twin), scale = 1/temperature, negatives gathered across ranks under DDP."""
    from sentence_transformers.sentence_transformer import losses

    common = {"scale": 1.0 / temperature, "gather_across_devices": plan.world_size > 1}
    if plan.loss == "cached_mnrl":
        loss = losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=plan.mini_batch, **common)
    else:
        loss = losses.MultipleNegativesRankingLoss(model, **common)
    if dims:
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=dims)
    return loss
