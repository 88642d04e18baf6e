"""The `embedtune` command line: a thin layer over the stage functions.

Each module below adds its commands to the shared app on import.
"""

from embedtune.cli import (  # noqa: F401  (registers commands)
    config_cmd,
    corpus,
    eval,
    export,
    finetune,
    pipeline,
    platform,
    prep,
    sdg,
    serve,
)
from embedtune.cli._app import app

__all__ = ["app"]
