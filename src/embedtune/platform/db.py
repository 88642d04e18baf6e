"""The platform's state: SQLAlchemy 2.x tables (SQLite by default, PostgreSQL through the same URL).

Everything a restart must not lose lives here: jobs with their worker pid and heartbeat, datasets, models
with their lineage, deployments. Status changes that race (a worker finishing while a user cancels) go
through :func:`transition`, a compare-and-set UPDATE, so exactly one side wins.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    inspect,
    text,
    update,
)
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

log = logging.getLogger("embedtune.platform")


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)  # stored naive-UTC: SQLite keeps no offset


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:16]}"


class Base(DeclarativeBase):
    pass


class Workspace(Base):
    __tablename__ = "workspaces"
    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    description: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (UniqueConstraint("workspace", "name"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("dataset"))
    workspace: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(256))
    format: Mapped[str] = mapped_column(String(32))  # corpus | beir | training
    source: Mapped[str] = mapped_column(String(16))  # upload | path
    path: Mapped[str] = mapped_column(Text)
    description: Mapped[str] = mapped_column(Text, default="")
    size_bytes: Mapped[int] = mapped_column(Integer, default=0)
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Model(Base):
    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("workspace", "name"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("model"))
    workspace: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(16))  # base | customized
    path: Mapped[str] = mapped_column(Text)  # folder, or a built-in spec such as "default"
    description: Mapped[str] = mapped_column(Text, default="")
    base_model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    dataset: Mapped[str | None] = mapped_column(String(256), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    artifacts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Job(Base):
    """A customization or evaluation job; the worker that runs it is recorded by pid, host and heartbeat."""

    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    workspace: Mapped[str] = mapped_column(String(128), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # customization | evaluation
    name: Mapped[str] = mapped_column(String(256), default="")
    status: Mapped[str] = mapped_column(String(16), index=True)
    status_details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    spec: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # the normalised request
    recipe: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    stages: Mapped[list[str]] = mapped_column(JSON, default=list)
    run_dir: Mapped[str] = mapped_column(Text, default="")
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    output_model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    executor: Mapped[str | None] = mapped_column(String(16), nullable=True)
    worker_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    worker_host: Mapped[str | None] = mapped_column(String(256), nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # epoch seconds
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims so far; also fences a stale worker out
    claimed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the service replica's id
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Deployment(Base):
    __tablename__ = "deployments"
    __table_args__ = (UniqueConstraint("workspace", "name"),)
    id: Mapped[str] = mapped_column(String(64), primary_key=True, default=lambda: new_id("deployment"))
    workspace: Mapped[str] = mapped_column(String(128), index=True)
    name: Mapped[str] = mapped_column(String(256))
    model: Mapped[str] = mapped_column(String(256))
    model_path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), index=True)  # pending | ready | failed | deleted
    url: Mapped[str | None] = mapped_column(Text, nullable=True)
    port: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    host: Mapped[str | None] = mapped_column(String(256), nullable=True)
    served_model: Mapped[str | None] = mapped_column(String(512), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)


class ApiKey(Base):
    """An API key: only a hash of the token is stored (see :mod:`embedtune.platform.auth`)."""

    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # also the token's public prefix
    name: Mapped[str] = mapped_column(String(128))
    secret_hash: Mapped[str] = mapped_column(String(128))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    workspaces: Mapped[list[str]] = mapped_column(JSON, default=list)  # ignored for admin keys (all)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class AuditEvent(Base):
    """Who created, cancelled, deleted (or revoked) what, and when."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    actor: Mapped[str] = mapped_column(String(256))  # "key-id (name)", or "cli", or "anonymous" (auth off)
    action: Mapped[str] = mapped_column(String(32))  # create | cancel | delete | revoke
    kind: Mapped[str] = mapped_column(String(32))  # workspace | dataset | model | job | deployment | api_key
    target: Mapped[str] = mapped_column(String(256))
    workspace: Mapped[str | None] = mapped_column(String(128), nullable=True, index=True)
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


TERMINAL = ("completed", "failed", "cancelled")
ACTIVE = ("running", "cancelling")


def make_engine(url: str, migrate: bool = True) -> Engine:
    """An engine for ``url``; with ``migrate`` the schema is first brought to the newest revision (the service).

    Workers pass ``migrate=False``: the service that launched them has already upgraded the database.
    """
    if migrate and not _in_memory(url):
        upgrade(url)
    if url.startswith("sqlite"):
        _create_private(url)
        # Several processes (service, workers) write: WAL lets readers proceed, busy_timeout waits out locks.
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    else:
        # Route handlers run in a thread pool of 40: a connection for each, so a burst waits on the
        # database rather than on the pool (the server's max_connections must allow 45 per replica).
        engine = create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=40)
    if migrate and _in_memory(url):
        _upgrade_engine(engine, "head")
    return engine


def _create_private(url: str) -> None:
    """Create a new SQLite file 0600 before SQLite does (it would use the umask, typically 0644): the file
    holds every workspace's records and the key hashes. SQLite gives its -wal/-shm files the same mode."""
    if _in_memory(url):
        return
    database = make_url(url).database
    if database and not os.path.exists(database):
        with contextlib.suppress(FileExistsError):
            os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _in_memory(url: str) -> bool:
    return url.startswith("sqlite") and (url.rstrip("/") in ("sqlite:", "sqlite+pysqlite:") or ":memory:" in url)


MIGRATION_LOCK = 0x656D6274756E65  # any constant: the advisory lock two replicas starting at once take


def upgrade(url: str, revision: str = "head") -> str | None:
    """Apply the shipped Alembic migrations up to ``revision``; returns the revision the database is at.

    Safe when several replicas start at once: PostgreSQL takes an advisory lock and SQLite a write
    lock (``BEGIN IMMEDIATE``) for the whole upgrade, so one replica migrates and the others find it done.
    A database the platform created before it had migrations (tables, no ``alembic_version``) is stamped
    at the baseline revision first, so it is upgraded in place and not created again.
    """
    engine = make_engine(url, migrate=False)
    try:
        return _upgrade_engine(engine, revision)
    finally:
        engine.dispose()


def _upgrade_engine(engine: Engine, revision: str) -> str | None:
    try:
        from alembic import command
        from alembic.runtime.migration import MigrationContext
    except ImportError as exc:
        raise RuntimeError("the platform's database migrations need alembic: pip install 'embedtune[platform]'") \
            from exc

    from embedtune.platform import migrations

    with _locked_transaction(engine) as conn:
        cfg = migrations.config(conn)
        tables = set(inspect(conn).get_table_names())
        if "alembic_version" not in tables and {"workspaces", "jobs"} <= tables:
            log.info("database made before migrations existed: stamping it at %s", migrations.BASELINE)
            command.stamp(cfg, migrations.BASELINE)
        before = MigrationContext.configure(conn).get_current_revision()
        command.upgrade(cfg, revision)
        after = MigrationContext.configure(conn).get_current_revision()
    if before != after:
        log.info("database upgraded from %s to %s", before or "empty", after)
    return after


@contextmanager
def _locked_transaction(engine: Engine) -> Iterator[Connection]:
    """One transaction that holds the migration lock until it commits."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            raw = conn.connection.dbapi_connection
            saved = raw.isolation_level
            raw.isolation_level = None  # sqlite3 must not open its own (deferred) transaction around ours
            try:
                conn.exec_driver_sql("BEGIN IMMEDIATE")
                yield conn
                conn.commit()
            except BaseException:
                conn.rollback()
                raise
            finally:
                raw.isolation_level = saved
            return
        with conn.begin():
            if engine.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
            yield conn


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def transition(session: Session, job_id: str, from_status: str | tuple[str, ...], attempt: int | None = None,
               **values: Any) -> bool:
    """Compare-and-set: update the job only if its status is still one of ``from_status``.

    With ``attempt``, only if the job is still in that attempt: a worker or replica acting on an attempt
    that was since re-queued and claimed again changes nothing.
    """
    allowed = (from_status,) if isinstance(from_status, str) else from_status
    values.setdefault("updated_at", utcnow())
    if values.get("status") in TERMINAL:
        values.setdefault("finished_at", utcnow())
    stmt = update(Job).where(Job.id == job_id, Job.status.in_(allowed)).values(**values)
    if attempt is not None:
        stmt = stmt.where(Job.attempts == attempt)
    changed = session.execute(stmt).rowcount == 1
    session.commit()
    return changed


LIVE_DEPLOYMENT = ("pending", "ready")


def update_deployment(session: Session, dep_id: str, from_status: tuple[str, ...], **values: Any) -> bool:
    """Compare-and-set for a deployment: the health check's verdict applies only while the deployment is
    still in ``from_status``, so a DELETE that committed meanwhile is never undone (no deleted deployment
    comes back as ``failed``)."""
    values.setdefault("updated_at", utcnow())
    stmt = update(Deployment).where(Deployment.id == dep_id, Deployment.status.in_(from_status)).values(**values)
    changed = session.execute(stmt).rowcount == 1
    session.commit()
    return changed
