"""An int8 graph that failed the export's retrieval parity gate is not deployed unless asked for by name."""

from __future__ import annotations

import json

import pytest

from embedtune.retrieval.encoders import served_model
from embedtune.retrieval.metadata import int8_parity_failure, write_metadata
from embedtune.retrieval.precision import pick_precision


def export_folder(tmp_path, int8_passed: bool | None):
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"fp32")
    (folder / "model.int8.onnx").write_bytes(b"int8")
    write_metadata(folder, {"dimension": 8})
    if int8_passed is not None:
        failures = [] if int8_passed else ["ndcg@1: int8 0.5000 vs fp32 1.0000 (|Δ| 0.5000 > 0.03)"]
        (folder / "parity.json").write_text(json.dumps(
            {"passed": int8_passed, "int8_vs_fp32": {"retrieval": {"passed": int8_passed, "failures": failures}}}))
    return folder


@pytest.mark.parametrize("int8_passed", [True, None])
def test_int8_that_passed_or_was_never_gated_is_the_cpu_default(tmp_path, int8_passed):
    folder = export_folder(tmp_path, int8_passed)
    assert int8_parity_failure(folder) is None
    assert pick_precision(folder, on_gpu=False) == "int8"
    assert served_model(tmp_path, "base").precision == "int8"


def test_int8_that_failed_parity_is_skipped_by_default_with_the_reason(tmp_path, caplog, monkeypatch):
    import logging

    caplog.set_level(logging.WARNING, logger="embedtune")
    monkeypatch.setattr(logging.getLogger("embedtune"), "propagate", True)
    folder = export_folder(tmp_path, False)
    reason = int8_parity_failure(folder)
    assert reason and "ndcg@1" in reason and "parity.json" in reason
    assert pick_precision(folder, on_gpu=False) == "fp32"
    assert "using fp32 instead" in caplog.text and "ndcg@1" in caplog.text
    assert pick_precision(folder, on_gpu=False, precision="int8") == "int8"  # asked for by name: the operator's call
    assert served_model(tmp_path, "base").precision == "fp32"  # what the index stage and eval encode with
