"""The `embedtune` command line: a thin layer over the stage functions.

Each module below adds its commands to the shared app on import; the import order is the order
`embedtune --help` lists them in, which is the pipeline's order.
"""

# isort: off
from embedtune.cli import corpus, sdg, prep, finetune, eval, export, deploy, serve  # noqa: F401
from embedtune.cli import pipeline, platform, config_cmd  # noqa: F401
# isort: on
from embedtune.cli._app import app

__all__ = ["app"]
