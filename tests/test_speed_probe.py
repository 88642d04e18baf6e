"""``auto`` serves int8 on a CPU without int8 dot products only where a probe on this machine found it faster."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from embedtune.retrieval import speed_probe
from embedtune.retrieval.precision import pick_precision
from test_serve_models import bag_of_embeddings_graph


@pytest.fixture
def export(tmp_path, monkeypatch):
    """An export folder with an fp32 and an int8 graph, a private cache, and the probe switched on."""
    folder = tmp_path / "export"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("model.onnx", "model.int8.onnx"):
        onnx.save(bag_of_embeddings_graph(rng.standard_normal((2000, 8)).astype(np.float32)), str(folder / name))
    (folder / "embedtune.json").write_text(json.dumps({"dimension": 8, "max_seq_length": 32, "inputs": [
        "input_ids", "attention_mask", "token_type_ids"], "output": "embeddings"}))
    monkeypatch.setenv("EMBEDTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv(speed_probe.PROBE_ENV, "1")
    monkeypatch.setattr(speed_probe, "has_int8_dot_product", lambda: False)
    return folder


def _timings(monkeypatch, ms: dict[str, float]) -> list[str]:
    """Replace the stopwatch: each graph takes the given milliseconds; returns the files timed, in order."""
    timed: list[str] = []

    def best_ms(model_file, threads, dimension, rows_alone=False):
        timed.append(model_file.name)
        return ms[model_file.name]

    monkeypatch.setattr(speed_probe, "_best_ms", best_ms)
    return timed


@pytest.mark.parametrize(("int8_ms", "served"), [(9.5, "fp32"), (5.0, "int8")])
def test_auto_serves_int8_only_where_it_was_measured_faster(export, monkeypatch, int8_ms, served):
    _timings(monkeypatch, {"model.onnx": 10.0, "model.int8.onnx": int8_ms})
    assert pick_precision(export, on_gpu=False) == served
    assert pick_precision(export, on_gpu=False, precision="int8") == "int8"  # by name: always


def test_a_cpu_with_int8_dot_products_is_not_probed(export, monkeypatch):
    timed = _timings(monkeypatch, {"model.onnx": 10.0, "model.int8.onnx": 20.0})
    monkeypatch.setattr(speed_probe, "has_int8_dot_product", lambda: True)
    assert pick_precision(export, on_gpu=False) == "int8"
    monkeypatch.setenv(speed_probe.PROBE_ENV, "0")
    monkeypatch.setattr(speed_probe, "has_int8_dot_product", lambda: False)
    assert pick_precision(export, on_gpu=False) == "int8"  # the operator turned the probe off
    assert timed == []


def test_the_probe_runs_once_per_machine_and_export(export, monkeypatch):
    real = speed_probe._best_ms
    timed: list[str] = []

    def counting(model_file, threads, dimension, rows_alone=False):
        timed.append(model_file.name)
        assert rows_alone == (model_file.name == "model.int8.onnx")  # int8 timed as the server runs it
        return real(model_file, threads, dimension, rows_alone)

    monkeypatch.setattr(speed_probe, "_best_ms", counting)
    first = speed_probe.int8_speed(export)
    assert first.fp32_ms > 0 and first.int8_ms > 0 and timed == ["model.onnx", "model.int8.onnx"]
    assert speed_probe.int8_speed(export) == first and len(timed) == 2  # a restart reads the cache
    stat = (export / "model.int8.onnx").stat()
    os.utime(export / "model.int8.onnx", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # a new export
    speed_probe.int8_speed(export)
    monkeypatch.setattr(speed_probe, "isa_summary", lambda: "another CPU")  # another machine
    speed_probe.int8_speed(export)
    assert len(timed) == 6
