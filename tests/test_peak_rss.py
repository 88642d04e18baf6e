"""Each stage's manifest records its own peak resident memory (issue 23, item 3)."""

from __future__ import annotations

import time

import numpy as np

from embedtune.artifacts import PeakRss, RunDir


def _hold(mb: int, seconds: float) -> None:
    block = np.ones(mb * 2**20 // 8)  # touched pages: resident, not just reserved
    time.sleep(seconds)
    del block


def test_stage_manifest_records_the_peak_of_a_short_lived_allocation(tmp_path):
    run = RunDir(tmp_path / "run")
    stage = run.stage("demo", {"x": 1})
    assert stage.up_to_date() is None
    before = PeakRss().start().stop()
    _hold(300, 1.0)  # freed before finish(): only a sampler sees it
    manifest = stage.finish(counts={"n": 1})
    assert manifest.peak_rss_mb is not None and manifest.peak_rss_mb >= before + 250
    assert run.manifest("demo").peak_rss_mb == manifest.peak_rss_mb


def test_a_later_stage_does_not_inherit_an_earlier_peak(tmp_path):
    run = RunDir(tmp_path / "run")
    first = run.stage("hungry", {})
    first.up_to_date()
    _hold(300, 1.0)
    hungry = first.finish()
    second = run.stage("light", {})
    second.up_to_date()
    light = second.finish()
    assert light.peak_rss_mb < hungry.peak_rss_mb - 200  # ru_maxrss would report the same figure for both
