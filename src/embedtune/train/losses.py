"""The training losses, one entry each in :data:`LOSSES` (then wrapped in Matryoshka when dims are given).

- ``mnrl`` / ``cached_mnrl``: InfoNCE over 1 positive + hard negatives + in-batch negatives (NVIDIA's
  recipe); the cached one is GradCache: the same batch and gradient computed in mini-batches that fit.
- ``margin_mse``: the student's score margins (positive minus each hard negative) regress onto prep's teacher
  margins (GPL, Wang et al. 2022). Graded targets instead of "the positive wins": a negative the teacher
  finds nearly as good is pushed away only a little, and a mislabeled positive costs little.

A new loss is one :class:`LossSpec` here; ``finetune.loss`` accepts every name in :data:`LOSSES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from torch import nn

    from embedtune.train.plan import BatchPlan


@dataclass(frozen=True)
class LossSpec:
    build: Callable[[SentenceTransformer, BatchPlan, dict[str, Any]], nn.Module]
    needs_scores: bool = False  # trains on prep's teacher scores (pos_scores/neg_scores), not only on texts


def _mnrl(model, plan, common):
    from sentence_transformers.sentence_transformer import losses

    return losses.MultipleNegativesRankingLoss(model, **common)


def _cached_mnrl(model, plan, common):
    from sentence_transformers.sentence_transformer import losses

    return losses.CachedMultipleNegativesRankingLoss(model, mini_batch_size=plan.mini_batch, **common)


def _margin_mse(model, plan, common):
    from sentence_transformers.sentence_transformer import losses

    return losses.MarginMSELoss(model)


LOSSES: dict[str, LossSpec] = {
    "mnrl": LossSpec(_mnrl),
    "cached_mnrl": LossSpec(_cached_mnrl),
    "margin_mse": LossSpec(_margin_mse, needs_scores=True),
}


def build_loss(
    model: SentenceTransformer, plan: BatchPlan, temperature: float, dims: list[int] | None
) -> nn.Module:
    """The plan's loss (scale = 1/temperature; negatives gathered across ranks under DDP), wrapped in
    MatryoshkaLoss when ``dims`` are given."""
    from sentence_transformers.sentence_transformer import losses

    common = {"scale": 1.0 / temperature, "gather_across_devices": plan.world_size > 1}
    loss = LOSSES[plan.loss].build(model, plan, common)
    if dims:
        loss = losses.MatryoshkaLoss(model, loss, matryoshka_dims=dims)
    return loss
