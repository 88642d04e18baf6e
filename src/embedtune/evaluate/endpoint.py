"""A model served behind an OpenAI-compatible ``/v1/embeddings`` URL, checked against local figures."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from embedtune.config import EvalConfig
from embedtune.evaluate.core import ModelResult, evaluate_encoder
from embedtune.retrieval.beir import BeirDataset
from embedtune.retrieval.encoders import EndpointEncoder
from embedtune.retrieval.metrics import DEFAULT_RANKING, RankingSpec


def evaluate_endpoint(
    base_url: str,
    model_name: str,
    dataset: BeirDataset,
    api_key: str | None = None,
    *,
    batch_size: int = 64,
    dimensions: int | None = None,
    ranking: RankingSpec = DEFAULT_RANKING,
    max_retries: int = 5,
    timeout: float = 120.0,
) -> ModelResult:
    """BEIR metrics of a served model: queries sent with ``input_type=query``, the corpus with
    ``input_type=passage`` (the server applies its own prompts), in batches of ``batch_size``."""
    encoder = EndpointEncoder(base_url, model_name, api_key, batch_size, dimensions, max_retries, timeout,
                              label=f"endpoint {model_name}")
    return evaluate_encoder(encoder, dataset, ranking=ranking)


@dataclass(frozen=True)
class Violation:
    metric: str
    expected: float  # the reference (local) figure
    actual: float  # the figure under test (served)
    tolerance: float

    @property
    def diff(self) -> float:
        return self.actual - self.expected

    def __str__(self) -> str:
        return (f"{self.metric}: {self.actual:.4f} vs {self.expected:.4f} "
                f"(drift {self.diff:+.4f}, tolerance {self.tolerance})")

    def to_json(self) -> dict[str, float | str]:
        return {**asdict(self), "diff": self.diff}


_AT_K = re.compile(r"^[a-z_]+@(\d+)$")


def compare_within_tolerance(reference: Mapping[str, float], actual: Mapping[str, float],
                             low: float = 0.03, high: float = 0.01) -> list[Violation]:
    """Metrics ``name@k`` present in both whose drift exceeds ``low`` (k < 5) or ``high`` (k >= 5).

    Small k gets the looser bound because a single swapped pair moves @1 figures by 1/n_queries.
    """
    violations = []
    for metric, ref in reference.items():
        match = _AT_K.match(metric)
        if match is None or metric not in actual:
            continue
        tol = low if int(match.group(1)) < 5 else high
        if abs(float(actual[metric]) - float(ref)) > tol + 1e-9:
            violations.append(Violation(metric, float(ref), float(actual[metric]), tol))
    return violations


def check_endpoint(results: dict, dataset: BeirDataset, url: str, model_name: str | None, api_key: str | None,
                   cfg: EvalConfig, tolerance_low_k: float, tolerance_high_k: float) -> list[Violation]:
    """Score a served model on ``dataset`` and compare it with the local reference in ``results`` (the
    fine-tuned model when there is one): records ``results["endpoint"]`` and returns the violations."""
    name = model_name or first_served_model(url, api_key)
    served = evaluate_endpoint(url, name, dataset, api_key, batch_size=cfg.batch_size, ranking=RankingSpec.of(cfg))
    ref_key = "finetuned" if results.get("finetuned") else results["models"][0]
    violations = compare_within_tolerance(results[ref_key], served.metrics, tolerance_low_k, tolerance_high_k)
    results["endpoint"] = {"base_url": url, "model": name, "reference": ref_key, "metrics": served.metrics,
                           "tolerance_low_k": tolerance_low_k, "tolerance_high_k": tolerance_high_k,
                           "violations": [v.to_json() for v in violations]}
    return violations


def first_served_model(url: str, api_key: str | None) -> str:
    from openai import OpenAI

    base = url.rstrip("/") + ("" if url.rstrip("/").endswith("/v1") else "/v1")
    served = OpenAI(base_url=base, api_key=api_key or "not-needed").models.list().data
    if not served:
        raise ValueError(f"{url} serves no model; pass --endpoint-model")
    return served[0].id
