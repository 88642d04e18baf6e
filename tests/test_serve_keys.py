"""`embedtune serve`: the key never comes from a command-line value; without one the server uses a generated
0600 key file, and serving without any key takes --insecure-no-auth on loopback."""

from __future__ import annotations

import os
import stat

import pytest
from typer.testing import CliRunner

import embedtune.serve
from embedtune.cli import app
from embedtune.serve.keys import is_loopback


@pytest.fixture(autouse=True)
def key_file(tmp_path, monkeypatch):
    """Where a key-less start keeps its generated key (never the developer's ~/.config)."""
    path = tmp_path / "config" / "serve.key"
    monkeypatch.setenv("EMBEDTUNE_SERVE_KEY_FILE", str(path))
    return path


@pytest.fixture
def started(monkeypatch):
    """What `embedtune serve` would have started (the real uvicorn run is replaced)."""
    calls: dict = {}

    def fake_run_server(entries, cfg, key, log_level, docs=True):
        calls.update(cfg=cfg, key=key, docs=docs)

    monkeypatch.setattr(embedtune.serve, "run_server", fake_run_server)
    return calls


def serve(*args: str):
    return CliRunner().invoke(app, ["serve", "--model", "default", *args])


def test_a_key_given_as_a_command_line_value_is_refused_with_guidance(started):
    result = serve("--api-key", "hunter2-secret")
    assert result.exit_code == 1 and not started
    assert "--api-key-env" in result.output and "--api-key-file" in result.output and "ps" in result.output
    assert "hunter2-secret" not in result.output


def test_key_from_an_environment_variable(started, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_TEST_KEY", "  k-env \n")
    assert serve("--api-key-env", "EMBEDTUNE_TEST_KEY").exit_code == 0
    assert started["key"] == "k-env" and started["cfg"].api_key_env == "EMBEDTUNE_TEST_KEY"


def test_an_unset_key_variable_is_an_error_not_an_open_server(started, monkeypatch):
    monkeypatch.delenv("EMBEDTUNE_TEST_KEY", raising=False)
    result = serve("--api-key-env", "EMBEDTUNE_TEST_KEY")
    assert result.exit_code == 1 and "EMBEDTUNE_TEST_KEY" in result.output and not started


def test_key_from_a_file(started, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("k-file\n")
    key_file.chmod(0o600)
    assert serve("--api-key-file", str(key_file)).exit_code == 0
    assert started["key"] == "k-file"
    key_file.write_text("\n")
    empty = serve("--api-key-file", str(key_file))
    assert empty.exit_code == 1 and "is empty" in empty.output
    missing = serve("--api-key-file", str(tmp_path / "nope"))
    assert missing.exit_code == 1 and "not found" in missing.output


def test_non_loopback_host_without_a_key_option_is_refused_even_with_the_insecure_flag(started, monkeypatch):
    monkeypatch.delenv("EMBEDTUNE_TEST_KEY", raising=False)
    refused = serve("--host", "0.0.0.0")
    assert refused.exit_code == 1 and "--api-key-env" in refused.output and not started
    insecure = serve("--host", "0.0.0.0", "--insecure-no-auth")
    assert insecure.exit_code == 1 and "refusing" in insecure.output and not started


def test_non_loopback_host_with_a_key_is_allowed(started, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_TEST_KEY", "k")
    assert serve("--host", "0.0.0.0", "--api-key-env", "EMBEDTUNE_TEST_KEY").exit_code == 0
    assert started["key"] == "k"


def test_loopback_without_a_key_option_generates_a_private_key_and_reuses_it(started, key_file):
    first = serve("--host", "127.0.0.1")
    assert first.exit_code == 0, first.output
    key = started["key"]
    assert key and len(key) >= 32 and key_file.read_text().strip() == key
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert str(key_file) in first.output and key not in first.output  # the path is shown, the secret is not
    started.clear()
    assert serve("--host", "127.0.0.1").exit_code == 0 and started["key"] == key  # clients keep working


def test_serving_without_any_key_takes_the_insecure_flag_on_loopback(started, key_file, monkeypatch):
    result = serve("--host", "127.0.0.1", "--insecure-no-auth")
    assert result.exit_code == 0 and started["key"] is None and not key_file.exists()
    started.clear()
    monkeypatch.setenv("EMBEDTUNE_TEST_KEY", "k")
    both = serve("--insecure-no-auth", "--api-key-env", "EMBEDTUNE_TEST_KEY")
    assert both.exit_code == 1 and "contradicts" in both.output and not started


def test_request_token_budget_flag_reaches_the_config(started):
    assert serve("--max-request-tokens", "4096").exit_code == 0
    assert started["cfg"].max_request_tokens == 4096
    assert serve("--max-request-tokens", "0").exit_code == 2  # a recipe error names the key


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.9.9.9", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.5", False), ("example.com", False), ("", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_help_does_not_offer_a_key_value_option():
    text = CliRunner().invoke(app, ["serve", "--help"], env={**os.environ, "COLUMNS": "200"}).output
    assert "--api-key-env" in text and "--api-key-file" in text and "--insecure-no-auth" in text
    assert "--api-key " not in text
