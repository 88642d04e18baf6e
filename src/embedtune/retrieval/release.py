"""The release gate: which retrieval a run deploys, decided on paired per-query scores.

The eval stage scores every retrieval on the same queries (the user's real ones when ``eval.dataset`` is
given, else the synthetic held-out ones) and keeps each query's score (``results["per_query"]``). The
*champion* is what is served today (the base model, dense or fused with BM25, whichever scored higher, or
the retrieval a previous deployment serves); the *challenger* is the fine-tuned model's best retrieval
(dense, fused with BM25, or a Matryoshka size when it costs nothing). The challenger replaces the
champion only when the paired interval of their difference in nDCG@10 lies wholly above ``min_gain``.

One function decides, and everything that states a verdict calls it: the eval report (as the gate's
recommendation), the deploy stage (which acts on it and records ``deploy/decision.json``), the CLI summary
and the PNG. So they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from embedtune.retrieval.stats import CONFIDENCE, PairedDifference, paired_difference

METRIC = "ndcg@10"
Mode = Literal["dense", "hybrid", "bm25"]
_MODEL_LABEL = {"base": "base", "finetuned": "fine-tuned"}


@dataclass(frozen=True)
class Retrieval:
    """A retrieval as eval names it: ``base``, ``finetuned_hybrid``, ``finetuned@128``, ``bm25``."""

    key: str
    model: str | None  # "base" | "finetuned"; None for BM25 alone
    mode: Mode
    dims: int | None = None  # Matryoshka truncation; None = full width

    @classmethod
    def parse(cls, key: str) -> Retrieval:
        if key == "bm25":
            return cls(key, None, "bm25")
        model, _, dims = key.partition("@")
        if model.endswith("_hybrid"):
            return cls(key, model.removesuffix("_hybrid"), "hybrid")
        return cls(key, model, "dense", int(dims) if dims else None)

    @property
    def label(self) -> str:
        if self.model is None:
            return "BM25"
        name = _MODEL_LABEL.get(self.model, self.model)
        if self.mode == "hybrid":
            return f"{name} + BM25"
        return f"{name} @ {self.dims} dims" if self.dims else f"{name} (dense)"


@dataclass(frozen=True)
class Decision:
    deployed: str  # the retrieval served (a key of results["per_query"])
    champion: str
    challenger: str | None
    difference: PairedDifference | None  # challenger - champion, nDCG@10, paired
    reason: str
    query_set: str
    queries: int
    forced: bool = False
    min_gain: float = 0.0
    bm25_weight: float | None = None

    @property
    def retrieval(self) -> Retrieval:
        return Retrieval.parse(self.deployed)

    @property
    def challenger_won(self) -> bool:
        return self.challenger is not None and self.deployed == self.challenger

    def line(self) -> str:
        """The verdict in one line, as every surface prints it."""
        return f"deploy {self.retrieval.label} — {self.reason}"

    def to_json(self) -> dict[str, Any]:
        r = self.retrieval
        return {"deployed": self.deployed, "label": r.label, "model": r.model, "mode": r.mode, "dims": r.dims,
                "champion": self.champion, "challenger": self.challenger, "metric": METRIC,
                "difference": self.difference.to_json() if self.difference else None,
                "reason": self.reason, "line": self.line(), "query_set": self.query_set, "queries": self.queries,
                "forced": self.forced, "min_gain": self.min_gain, "bm25_weight": self.bm25_weight}


def scores(results: dict[str, Any], metric: str = METRIC) -> dict[str, list[float]]:
    """Per-query ``metric`` of every retrieval eval scored, aligned on ``per_query.query_ids``."""
    return dict((results.get("per_query") or {}).get(metric) or {})


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def decide(results: dict[str, Any], *, champion: str | None = None, force: bool = False, min_gain: float = 0.0,
           confidence: float = CONFIDENCE, seed: int = 0) -> Decision:
    """The gate on ``eval/results.json``: challenger vs champion on paired nDCG@10."""
    per = scores(results)
    if not per:
        raise ValueError("eval results hold no per-query scores (rerun the eval stage)")
    n = len(next(iter(per.values())))
    where = dict(query_set=str(results.get("dataset", "")), queries=n, min_gain=min_gain,
                 bm25_weight=(results.get("hybrid") or {}).get("bm25_weight"))
    champ = champion if champion in per else _best(per, ("base", "base_hybrid"))
    if champ is None:
        raise ValueError("eval results hold no base-model retrieval to compare with")
    challenger = _challenger(per)
    if challenger is None:
        return Decision(champ, champ, None, None, "no fine-tuned model was evaluated", **where)
    diff = paired_difference(per[challenger], per[champ], confidence=confidence, seed=seed)
    c, k = Retrieval.parse(challenger).label, Retrieval.parse(champ).label
    pct = f"{int(round(confidence * 100))} %"
    if force:
        return Decision(challenger, champ, challenger, diff, f"forced over {k}: {diff.describe()} nDCG@10",
                        forced=True, **where)
    if diff.beyond(min_gain):
        return Decision(challenger, champ, challenger, diff, f"beats {k} by {diff.describe()} nDCG@10, "
                        f"the {pct} paired interval above {min_gain:+.4f}", **where)
    return Decision(champ, champ, challenger, diff, f"{c} does not beat it beyond the noise: {diff.describe()} "
                    f"nDCG@10 ({pct} paired interval; needs to lie above {min_gain:+.4f})", **where)


def without_evaluation(*, finetuned: bool, hybrid: bool, force: bool) -> Decision:
    """No eval results: nothing proves a fine-tune better, so the base model is deployed (``force``: the
    fine-tuned model all the same)."""
    champion = "base_hybrid" if hybrid else "base"
    challenger = ("finetuned_hybrid" if hybrid else "finetuned") if finetuned else None
    if force and challenger is not None:
        return Decision(challenger, champion, challenger, None, "forced without an evaluation", "", 0, forced=True)
    reason = ("no evaluation: nothing shows the fine-tuned model is better (run the eval stage)" if finetuned
              else "no fine-tuned model")
    return Decision(champion, champion, challenger, None, reason, "", 0)


def _best(per: dict[str, list[float]], keys: tuple[str, ...]) -> str | None:
    present = [k for k in keys if k in per]
    return max(present, key=lambda k: mean(per[k])) if present else None


def _challenger(per: dict[str, list[float]]) -> str | None:
    """The fine-tuned model's best retrieval; a Matryoshka size replaces the full width only when it
    scores at least as well (it costs nothing, and the index is smaller)."""
    best = _best(per, ("finetuned", "finetuned_hybrid"))
    if best != "finetuned":
        return best
    smaller = sorted((k for k in per if k.startswith("finetuned@")), key=lambda k: int(k.split("@")[1]))
    return next((k for k in smaller if mean(per[k]) >= mean(per[best])), best)


def paired_vs(results: dict[str, Any], reference: str = "base", *, confidence: float = CONFIDENCE,
              seed: int = 0) -> dict[str, dict[str, Any]]:
    """Every retrieval's paired nDCG@10 difference to ``reference``: the report's intervals."""
    per = scores(results)
    if reference not in per:
        return {}
    return {k: paired_difference(v, per[reference], confidence=confidence, seed=seed).to_json()
            for k, v in per.items() if k != reference}
