"""`embedtune serve`: the key never comes from a command-line value, and no key means loopback only."""

from __future__ import annotations

import os

import pytest
from typer.testing import CliRunner

import embedtune.serve
from embedtune.cli import app
from embedtune.serve.keys import is_loopback


@pytest.fixture
def started(monkeypatch):
    """What `embedtune serve` would have started (the real uvicorn run is replaced)."""
    calls: dict = {}

    def fake_run_server(entries, cfg, key, log_level):
        calls.update(cfg=cfg, key=key)

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


def test_non_loopback_host_without_key_is_refused_unless_insecure_flag(started, monkeypatch):
    monkeypatch.delenv("EMBEDTUNE_TEST_KEY", raising=False)
    refused = serve("--host", "0.0.0.0")
    assert refused.exit_code == 1 and "--insecure-no-auth" in refused.output and not started
    assert serve("--host", "0.0.0.0", "--insecure-no-auth").exit_code == 0
    assert started["key"] is None and started["cfg"].host == "0.0.0.0"


def test_non_loopback_host_with_a_key_and_loopback_without_one_are_allowed(started, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_TEST_KEY", "k")
    assert serve("--host", "0.0.0.0", "--api-key-env", "EMBEDTUNE_TEST_KEY").exit_code == 0
    assert started["key"] == "k"
    started.clear()
    assert serve("--host", "127.0.0.1").exit_code == 0 and started["key"] is None


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
