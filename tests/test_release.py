"""The release gate: paired per-query statistics, and the decision every surface prints."""

from __future__ import annotations

import pytest

from embedtune.retrieval.release import Retrieval, decide, without_evaluation
from embedtune.retrieval.stats import paired_difference, unpaired_bound


def _results(per: dict[str, list[float]], name: str = "real") -> dict:
    n = len(next(iter(per.values())))
    return {"dataset": name, "n_queries": n, "hybrid": {"bm25_weight": 0.3},
            "per_query": {"query_ids": [f"q{i}" for i in range(n)], "ndcg@10": per}}


def test_paired_interval_separates_what_the_unpaired_bound_cannot():
    """Two retrievals equal on all but eight of 100 queries: the paired interval lies above zero; the old
    unpaired bound (±0.13 at nDCG 0.3) cannot tell them apart."""
    base = [0.3] * 100
    better = [0.8] * 8 + [0.3] * 92
    d = paired_difference(better, base)
    assert d.mean == pytest.approx(0.04)
    assert d.low > 0 and d.beyond()
    assert d.p_value < 0.05
    assert unpaired_bound(0.32, 100) > d.mean  # the unpaired verdict: "within the noise"
    assert d.half_width < unpaired_bound(0.32, 100) / 2


def test_three_queries_are_not_evidence():
    """All but three queries equal: no honest test separates them (sign-flip p = 0.25)."""
    d = paired_difference([0.8] * 3 + [0.3] * 97, [0.3] * 100)
    assert not d.beyond() and d.p_value > 0.2


def test_identical_retrievals_give_a_zero_width_interval_and_p_one():
    d = paired_difference([0.5, 0.2, 0.9], [0.5, 0.2, 0.9])
    assert (d.mean, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_paired_scores_must_align():
    with pytest.raises(ValueError, match="same length"):
        paired_difference([0.1, 0.2], [0.1])


def test_champion_stays_within_the_noise_and_the_line_says_why():
    noisy = [0.54 + (0.2 if i % 2 else -0.2) for i in range(60)]  # +0.02 on average, ±0.2 per query
    per = {"base": [0.5] * 60, "base_hybrid": [0.52] * 60, "finetuned": noisy, "finetuned_hybrid": noisy}
    decision = decide(_results(per))
    assert decision.deployed == "base_hybrid" and decision.champion == "base_hybrid"
    assert not decision.challenger_won
    assert decision.line().startswith("deploy base + BM25 — ") and "beyond the noise" in decision.line()


def test_challenger_wins_beyond_the_noise_and_force_overrides_the_gate():
    per = {"base": [0.5] * 50, "base_hybrid": [0.55] * 50, "finetuned": [0.6] * 50,
           "finetuned_hybrid": [0.55 + 0.1 * (i % 3 == 0) for i in range(50)]}
    won = decide(_results(per))
    assert won.deployed == "finetuned" and won.challenger_won and won.difference.low > 0
    assert won.to_json()["mode"] == "dense" and won.to_json()["bm25_weight"] == 0.3
    # A margin the gain does not clear keeps the champion.
    assert decide(_results(per), min_gain=0.1).deployed == "base_hybrid"
    tie = {"base": [0.5] * 10, "finetuned": [0.5] * 10}
    forced = decide(_results(tie), force=True)
    assert forced.deployed == "finetuned" and forced.forced and "forced" in forced.reason


def test_a_matryoshka_size_is_chosen_only_when_it_costs_nothing():
    per = {"base": [0.3] * 40, "finetuned": [0.7] * 40, "finetuned@128": [0.7] * 40, "finetuned@64": [0.69] * 40}
    assert decide(_results(per)).deployed == "finetuned@128"
    assert Retrieval.parse("finetuned@128").dims == 128 and Retrieval.parse("finetuned@128").mode == "dense"


def test_the_champion_is_what_is_served_now():
    per = {"base": [0.5] * 30, "base_hybrid": [0.6] * 30, "finetuned": [0.58] * 30}
    # The base model's dense search is served today: the fine-tune beats *it*, so it is deployed.
    assert decide(_results(per), champion="base").deployed == "finetuned"
    assert decide(_results(per)).deployed == "base_hybrid"


def test_without_evaluation_the_base_model_stays():
    d = without_evaluation(finetuned=True, hybrid=True, force=False)
    assert d.deployed == "base_hybrid" and "no evaluation" in d.reason
    assert without_evaluation(finetuned=True, hybrid=False, force=True).deployed == "finetuned"


def test_results_without_per_query_scores_are_refused():
    with pytest.raises(ValueError, match="per-query"):
        decide({"dataset": "x"})
