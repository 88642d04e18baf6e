"""The `embedtune` command line: a thin layer over the stage functions.

Each module below adds its commands to the shared app on import.
"""

from embedtune.cli import config_cmd, corpus, pipeline, platform  # noqa: F401  (registers commands)
from embedtune.cli._app import app

__all__ = ["app"]
