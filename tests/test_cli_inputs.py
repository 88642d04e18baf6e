"""Wrong inputs fail on the command line: a run directory that does not exist is a typo, not a new run."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from embedtune.cli import app


@pytest.mark.parametrize("command", ["sdg", "prep", "finetune", "eval", "export", "index"])
def test_a_stage_command_on_a_missing_run_dir_is_an_error(tmp_path, command):
    missing = tmp_path / "runs" / "nope"
    result = CliRunner().invoke(app, [command, "-r", str(missing)])
    assert result.exit_code == 1, result.output
    assert f"run directory {missing} does not exist" in " ".join(result.output.split())
    assert not missing.exists()  # nothing was started (export used to write the base model there)


def test_a_stage_command_on_an_existing_run_dir_goes_on(tmp_path):
    (tmp_path / "r").mkdir()
    result = CliRunner().invoke(app, ["prep", "-r", str(tmp_path / "r")])
    assert result.exit_code == 1 and "does not exist" not in result.output  # on to the stage: no corpus there
    assert "corpus" in result.output


def test_version_and_shell_completion():
    from importlib.metadata import version

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"embedtune {version('embedtune')}"
    shown = CliRunner().invoke(app, ["--show-completion", "bash"], prog_name="embedtune")
    assert shown.exit_code == 0 and "complete" in shown.output and "_EMBEDTUNE_COMPLETE" in shown.output


def test_config_show_describes_each_key_and_stays_the_same_yaml():
    import yaml

    from embedtune.config import dump_recipe, load_recipe

    result = CliRunner().invoke(app, ["config", "show", "-o", "corpus.min_chars=7"])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(result.output) == yaml.safe_load(dump_recipe(load_recipe(None, ["corpus.min_chars=7"])))
    lines = result.output.splitlines()
    at = lines.index("  min_chars: 7")
    assert lines[at - 1] == "  # documents shorter than this are dropped"
    bare = CliRunner().invoke(app, ["config", "show", "--no-comments"])
    assert bare.exit_code == 0 and "#" not in bare.output.replace("'#'", "")
