"""The platform's schema history: Alembic migrations, shipped with the package and applied on start.

:func:`embedtune.platform.db.upgrade` brings a database to the newest revision (the service calls it on
start; ``embedtune platform db upgrade`` runs it alone). Revision ``0001`` is the schema the platform made
with ``create_all`` before it had migrations, so such a database is stamped at ``0001`` and upgraded from there.

A schema change is a model change in ``db.py`` plus a new file in ``versions/``; let Alembic draft it from
the models and read what it wrote before committing it::

    python -c "from embedtune.platform.migrations import revision; revision('what changed')"

``tests/test_platform_migrations.py`` fails while the models and the migrations disagree.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from alembic.config import Config
from sqlalchemy.engine import Connection

HERE = Path(__file__).resolve().parent
BASELINE = "0001"  # the schema create_all made before migrations existed


def config(connection: Connection | None = None, url: str | None = None) -> Config:
    """An Alembic config for the shipped scripts, bound to an open connection (or a URL)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(config()).get_current_head()


def revision(message: str, rev_id: str | None = None) -> Path:
    """Draft the next migration from the difference between the models and the newest revision."""
    from alembic import command
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(config())
    rev_id = rev_id or f"{len(list(scripts.walk_revisions())) + 1:04d}"
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/draft.db"
        command.upgrade(config(url=url), "head")  # a new, empty database: nothing to stamp or lock
        script = command.revision(config(url=url), message=message, autogenerate=True, rev_id=rev_id)
    return Path(script.path)
