"""`embedtune serve` as a user starts it: a model that cannot load ends the server with an error."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from embedtune.config import ServeConfig
from embedtune.serve import ModelEntry
from embedtune.serve.app import ModelLoadError
from embedtune.serve.runner import run_server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(60)  # without the stop, the server would serve on
def test_run_server_stops_and_raises_when_a_model_cannot_load():
    def broken():
        raise OSError("no weights in /models/x")

    entries = [ModelEntry("x", "/models/x", broken)]
    with pytest.raises(ModelLoadError, match=r"model x \(/models/x\) failed to load: OSError: no weights"):
        run_server(entries, ServeConfig(port=_free_port()), None, log_level="warning")


@pytest.mark.timeout(300)
def test_serve_cli_exits_non_zero_with_one_error_line_for_a_missing_model(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "EMBEDTUNE_SERVE_KEY_FILE": str(tmp_path / "serve.key")}
    proc = subprocess.run([sys.executable, "-m", "embedtune", "serve", "--model", str(tmp_path / "runs" / "nope2"),
                           "--port", str(_free_port())], capture_output=True, text=True, timeout=240, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nope2" in errors[0] and "failed to load" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
