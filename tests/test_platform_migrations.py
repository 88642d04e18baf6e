"""The platform's schema migrations, on a SQLite file and on a real PostgreSQL server (tests/pg_fixture.py).

A database written at the first revision upgrades to the newest with every row intact; a database made by
``create_all`` before migrations existed is stamped and upgraded, not re-created; the models and the
migrations agree; replicas starting at once on an empty database all come up on the same schema.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import MetaData, inspect, select, text
from sqlalchemy.engine import Engine

from embedtune.platform import db, migrations

SRC = Path(__file__).resolve().parents[1] / "src"
WHEN = datetime(2026, 1, 2, 3, 4, 5)


def engine_at(url: str, revision: str) -> Engine:
    assert db.upgrade(url, revision) == revision
    return db.make_engine(url, migrate=False)


def baseline_rows() -> dict[str, list[dict]]:
    """One row per table of revision 0001, every column set (JSON, datetimes, floats, NULLs)."""
    return {
        "workspaces": [{"name": "team", "description": "ours", "created_at": WHEN}],
        "datasets": [{"id": "dataset-1", "workspace": "team", "name": "docs", "format": "corpus", "source": "upload",
                      "path": "/data/datasets/dataset-1", "description": "", "size_bytes": 1234,
                      "stats": {"files": 3, "splits": {"test": 2}}, "created_at": WHEN}],
        "models": [{"id": "model-1", "workspace": "team", "name": "ft", "kind": "customized", "path": "/m/ft",
                    "description": "fine-tuned", "base_model": "default", "dataset": "docs", "job_id": "cust-1",
                    "hyperparameters": {"epochs": 1, "lora": {"rank": 16}}, "metrics": {"ndcg@10": 0.61},
                    "artifacts": {"model": "/m/ft"}, "created_at": WHEN}],
        "jobs": [{"id": "cust-1", "workspace": "team", "kind": "customization", "name": "first", "status": "running",
                  "status_details": {"stage": "finetune", "stages_completed": ["prep"]}, "spec": {"model": "default"},
                  "recipe": {"finetune": {"epochs": 1}}, "stages": ["prep", "finetune"], "run_dir": "/runs/cust-1",
                  "result": {}, "output_model": None, "error": None, "executor": "local", "worker_pid": 4242,
                  "worker_host": "node-a", "heartbeat_at": 1767323045.125, "attempts": 1, "created_at": WHEN,
                  "updated_at": WHEN, "started_at": WHEN, "finished_at": None}],
        "deployments": [{"id": "deployment-1", "workspace": "team", "name": "ft-serve", "model": "ft",
                         "model_path": "/m/ft", "status": "ready", "url": "http://127.0.0.1:9000", "port": 9000,
                         "pid": 999, "host": "node-a", "served_model": "ft", "error": None, "created_at": WHEN,
                         "updated_at": WHEN}],
    }


def write_rows(engine: Engine, rows: dict[str, list[dict]]) -> None:
    """Insert through the tables as the database has them (reflected), not through today's models."""
    meta = MetaData()
    meta.reflect(engine)
    with engine.begin() as conn:
        for table, values in rows.items():
            conn.execute(meta.tables[table].insert(), values)


def read_rows(engine: Engine, rows: dict[str, list[dict]]) -> dict[str, list[dict]]:
    meta = MetaData()
    meta.reflect(engine)
    out = {}
    with engine.connect() as conn:
        for table, values in rows.items():
            cols = [meta.tables[table].c[name] for name in values[0]]
            out[table] = [dict(r._mapping) for r in conn.execute(select(*cols))]
    return out


def test_database_at_first_revision_upgrades_to_head_with_rows_intact(db_url):
    engine = engine_at(db_url, migrations.BASELINE)
    rows = baseline_rows()
    write_rows(engine, rows)
    engine.dispose()

    assert db.upgrade(db_url) == migrations.head()
    engine = db.make_engine(db_url, migrate=False)
    try:
        assert read_rows(engine, rows) == rows
        sessions = db.session_factory(engine)
        with sessions() as s:  # today's models read the old rows, and the new column is there, empty
            job = s.get(db.Job, "cust-1")
            assert job.claimed_by is None and job.stages == ["prep", "finetune"] and job.heartbeat_at == 1767323045.125
            assert db.transition(s, "cust-1", "running", attempt=1, status="completed")
    finally:
        engine.dispose()


def test_database_made_before_migrations_is_stamped_and_upgraded_in_place(db_url):
    # What create_all made before migrations existed: the baseline's tables and no alembic_version table.
    engine = engine_at(db_url, migrations.BASELINE)
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE alembic_version"))
    rows = baseline_rows()
    write_rows(engine, rows)
    engine.dispose()

    engine = db.make_engine(db_url)  # what the service does when it starts
    try:
        assert set(inspect(engine).get_table_names()) >= {"alembic_version", *rows}
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT version_num FROM alembic_version")) == migrations.head()
        assert read_rows(engine, rows) == rows
        assert "claimed_by" in {c["name"] for c in inspect(engine).get_columns("jobs")}
    finally:
        engine.dispose()


def test_models_and_migrations_agree(db_url):
    """A model change without its migration (or the reverse) fails here: write the migration."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    engine = db.make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), db.Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], f"models and migrations differ (draft one with migrations.revision()): {diff}"


def test_downgrade_to_baseline_and_back(db_url):
    engine = engine_at(db_url, migrations.head())
    write_rows(engine, baseline_rows())
    engine.dispose()
    from alembic import command

    command.downgrade(migrations.config(url=db_url), migrations.BASELINE)
    engine = db.make_engine(db_url, migrate=False)
    assert "claimed_by" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    engine.dispose()
    assert db.upgrade(db_url) == migrations.head()
    engine = db.make_engine(db_url, migrate=False)
    try:
        assert read_rows(engine, baseline_rows()) == baseline_rows()
    finally:
        engine.dispose()


def test_replicas_starting_at_once_on_an_empty_database_all_get_the_schema(db_url):
    """Three `embedtune platform db upgrade` processes at once: one migrates, the others wait and find it done."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    procs = [subprocess.Popen([sys.executable, "-m", "embedtune", "platform", "db", "upgrade", "--db", db_url],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for _ in range(3)]
    outputs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert all(f"is at revision {migrations.head()}" in out for out in outputs), outputs
    engine = db.make_engine(db_url, migrate=False)
    try:
        with engine.connect() as conn:
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalars().all() == [migrations.head()]
    finally:
        engine.dispose()


def test_postgres_fixture_refuses_to_skip_in_ci(monkeypatch):
    import pg_fixture

    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        pg_fixture.unavailable("no PostgreSQL here")
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="no PostgreSQL here"):
        pg_fixture.unavailable("no PostgreSQL here")


def test_db_upgrade_names_an_unreachable_database_without_its_password():
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    url = "postgresql+psycopg://team:s3cret@127.0.0.1:1/platform"  # port 1: nothing listens
    done = subprocess.run([sys.executable, "-m", "embedtune", "platform", "db", "upgrade", "--db", url],
                          capture_output=True, text=True, env=env, timeout=120)
    out = done.stdout + done.stderr
    assert done.returncode == 1 and "cannot open the database postgresql+psycopg://team:***@127.0.0.1:1/platform" in out
    assert "s3cret" not in out and "Traceback" not in out
