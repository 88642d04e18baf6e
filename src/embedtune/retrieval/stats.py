"""Paired statistics of two retrievals scored on the same queries.

A difference in mean nDCG@10 between two retrievals is only a finding when it exceeds what the choice of
queries could produce by chance. Both retrievals answer the *same* queries, so the test is on the per-query
differences (paired): most of the variance of nDCG is between queries (hard ones are hard for every
model) and cancels out. Two tools, as IR evaluation uses them (Smucker, Allan & Carterette, CIKM 2007;
Sakai, SIGIR 2006):

- a percentile bootstrap interval of the mean difference (``scipy.stats.bootstrap``): the interval the
  report shows and the release gate reads;
- a paired randomization test (sign flips of the differences, ``scipy.stats.permutation_test``): its
  two-sided p-value.

A handful of queries never makes a finding: if only three queries differ, a resample misses all three
about 5 % of the time and the sign-flip p-value is 0.25, so both tools say "not beyond the noise".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` of (a - b) over ``n`` queries, its ``confidence`` interval [``low``, ``high``], and the
    randomization test's two-sided ``p_value``."""

    mean: float
    low: float
    high: float
    p_value: float
    n: int
    confidence: float = CONFIDENCE

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def beyond(self, margin: float = 0.0) -> bool:
        """True when the whole interval lies above ``margin``: a gain beyond the noise (and the margin)."""
        return self.low > margin

    def to_json(self) -> dict[str, float | int]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def describe(self) -> str:
        return f"{self.mean:+.4f} [{self.low:+.4f}, {self.high:+.4f}] (p={self.p_value:.3g}, {self.n} queries)"


def paired_difference(a: Sequence[float], b: Sequence[float], *, confidence: float = CONFIDENCE,
                      resamples: int = RESAMPLES, seed: int = 0) -> PairedDifference:
    """The paired difference of per-query scores ``a - b`` (same queries, same order)."""
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired scores need two lists of the same length, got {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("paired scores need at least one query")
    d = x - y
    mean = float(d.mean())
    if np.ptp(d) == 0:  # every query moved by the same amount (often: not at all): no spread to resample
        return PairedDifference(mean, mean, mean, 1.0 if mean == 0 else 0.0, int(d.size), confidence)
    rng = np.random.default_rng(seed)
    interval = stats.bootstrap((d,), np.mean, confidence_level=confidence, n_resamples=resamples,
                               method="percentile", rng=rng).confidence_interval
    p = stats.permutation_test((d,), np.mean, permutation_type="samples", n_resamples=resamples,
                               alternative="two-sided", rng=rng).pvalue
    return PairedDifference(mean, float(interval.low), float(interval.high), float(p), int(d.size), confidence)


def unpaired_bound(mean: float, queries: int) -> float:
    """Two standard errors of an *unpaired* difference of two nDCG means, bounded without per-query scores
    (per-query nDCG lies in [0, 1], so its variance is at most m(1-m)). What a comparison of two means can
    say when the scores are gone; kept to show how much the paired test gains."""
    if queries <= 0:
        return float("inf")
    return 2 * float(np.sqrt(2 * max(mean * (1 - mean), 0.0) / queries))
