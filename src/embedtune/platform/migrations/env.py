"""Alembic's entry point for the platform's migrations (run by embedtune.platform.db.upgrade, not imported)."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from embedtune.platform import db

config = context.config
target_metadata = db.Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things in place: later migrations copy tables ("batch" mode).
        render_as_batch=connection.dialect.name == "sqlite",
    )


def run_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:  # db.upgrade passes its connection, already locked and in a transaction
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = db.make_engine(config.get_main_option("sqlalchemy.url"), migrate=False)
    try:
        with engine.begin() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


def run_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=target_metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
