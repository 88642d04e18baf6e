"""`embedtune platform`: the shared REST service (datasets, models, jobs, deployments, gateway), and
`embedtune platform keys create|list|revoke`: its API keys (run by the operator, on the service's database)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from embedtune.cli._app import app, user_errors
from embedtune.console import console

platform_app = typer.Typer(help="Run the platform service (no subcommand; see SECURITY.md), or manage its API keys.",
                           invoke_without_command=True,
                           no_args_is_help=False)
keys_app = typer.Typer(help="API keys of the platform (hashed at rest; a token is shown once).",
                       no_args_is_help=True)
platform_app.add_typer(keys_app, name="keys")
app.add_typer(platform_app, name="platform")

DbOpt = Annotated[str | None, typer.Option("--db", help="SQLAlchemy URL \\[default: a SQLite file in --data-dir]")]
DataDirOpt = Annotated[Path, typer.Option(help="datasets, job run dirs and logs")]
DEFAULT_DATA_DIR = Path("platform-data")
# The subcommands take --db/--data-dir too; None means "as given before the subcommand, else the default",
# so `embedtune platform --data-dir d keys list` and `embedtune platform keys list --data-dir d` agree.
SubDataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="datasets, job run dirs and logs \\[default: platform-data]")]

@platform_app.callback()
@user_errors
def platform_cmd(
    ctx: typer.Context,
    db: DbOpt = None,
    data_dir: DataDirOpt = DEFAULT_DATA_DIR,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8080,
    executor: Annotated[str, typer.Option(help="local (worker processes) or ray")] = "local",
    ray_address: Annotated[str | None, typer.Option(
        help="Ray cluster address \\[default: start a local one]")] = None,
    max_workers: Annotated[int, typer.Option(help="jobs running at once (local executor)")] = 1,
    on_orphan: Annotated[str, typer.Option(help="a job whose worker died unseen: fail or requeue")] = "fail",
    heartbeat: Annotated[float, typer.Option(help="worker heartbeat interval, seconds")] = 5.0,
    stale_after: Annotated[float, typer.Option(help="heartbeat age that means a dead worker, seconds")] = 30.0,
    max_upload_mb: Annotated[int, typer.Option(help="largest accepted upload")] = 1024,
    no_auth: Annotated[bool, typer.Option(
        "--no-auth", help="serve without API keys (refused unless --host is a loopback address)")] = False,
    allow_path_registration: Annotated[bool, typer.Option(
        help="let users register datasets/models by server path, under --path-root only")] = False,
    path_root: Annotated[list[Path] | None, typer.Option(
        help="a folder path registration may name (repeatable)")] = None,
    allow_llm_url: Annotated[list[str] | None, typer.Option(
        help="an sdg.llm.base_url jobs may use (repeatable)")] = None,
    allow_secret: Annotated[list[str] | None, typer.Option(
        help="an environment variable jobs may name as sdg.llm.api_key_env; passed to workers (repeatable)")] = None,
    quota_deployments: Annotated[int, typer.Option(help="deployments pending or ready per workspace")] = 4,
    quota_jobs: Annotated[int, typer.Option(help="jobs queued or running per workspace")] = 8,
    quota_gb: Annotated[float, typer.Option(help="GiB of datasets and job folders per workspace")] = 20.0,
) -> None:
    """Run the platform service: one process a team shares; jobs run in worker processes (see SECURITY.md)."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"db": db, "data_dir": data_dir}
        return
    from embedtune.platform import PlatformSettings, serve
    from embedtune.platform.auth import check_auth_setting

    check_auth_setting(not no_auth, host)
    settings = PlatformSettings(db_url=db, data_dir=data_dir, executor=executor, ray_address=ray_address,
                                max_workers=max_workers, on_orphan=on_orphan, heartbeat_seconds=heartbeat,
                                stale_after_seconds=stale_after, max_upload_bytes=max_upload_mb << 20,
                                auth=not no_auth, allow_path_registration=allow_path_registration,
                                path_roots=path_root or [], allowed_llm_base_urls=allow_llm_url or [],
                                allowed_secret_env=allow_secret or [], quota_deployments=quota_deployments,
                                quota_jobs=quota_jobs, quota_bytes=int(quota_gb * (1 << 30)))
    serve(settings, host=host, port=port)


def _where(ctx: typer.Context, db: str | None, data_dir: Path | None) -> tuple[str | None, Path]:
    """The database and data folder a subcommand acts on: its own options, else those given to `platform`."""
    parent = ctx.obj or {}  # click hands the `platform` callback's obj down to its subcommands
    return (db if db is not None else parent.get("db"),
            data_dir if data_dir is not None else parent.get("data_dir", DEFAULT_DATA_DIR))


def _sessions(ctx: typer.Context, db: str | None, data_dir: Path | None):  # noqa: ANN202
    from embedtune.platform import PlatformSettings
    from embedtune.platform import db as tables

    db, data_dir = _where(ctx, db, data_dir)
    settings = PlatformSettings(db_url=db, data_dir=data_dir).prepare()
    return tables.session_factory(tables.make_engine(settings.database_url))


@keys_app.command("create")
@user_errors
def keys_create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="who or what the key is for")],
    workspace: Annotated[list[str] | None, typer.Option(
        "--workspace", "-w", help="a workspace the key may use (repeatable; created if missing)")] = None,
    admin: Annotated[bool, typer.Option(help="every workspace, the audit log, workspace create/delete")] = False,
    db: DbOpt = None,
    data_dir: SubDataDirOpt = None,
) -> None:
    """Create a key and print its token once (only a hash is stored)."""
    from embedtune.platform import db as tables
    from embedtune.platform.auth import audit, create_key
    from embedtune.platform.schemas import WorkspaceCreate
    from embedtune.platform.state import ensure_workspace

    if not admin and not workspace:
        raise ValueError("give --workspace (repeatable) or --admin: a key with no workspace can do nothing")
    for ws in workspace or []:
        WorkspaceCreate(name=ws)  # the same name rule as the API
    with _sessions(ctx, db, data_dir)() as s:
        for ws in workspace or []:
            if s.get(tables.Workspace, ws) is None:
                audit(s, "cli", "create", "workspace", ws, workspace=ws)
                ensure_workspace(s, ws, "created with an API key")
        row, token = create_key(s, name, admin=admin, workspaces=workspace or [])
    console.print(f"created key {row.id} ({name}); the token is shown only now:", soft_wrap=True)
    print(token)


@keys_app.command("list")
@user_errors
def keys_list(ctx: typer.Context, db: DbOpt = None, data_dir: SubDataDirOpt = None,
              as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """List keys (never their tokens)."""
    from sqlalchemy import select

    from embedtune.platform import db as tables
    from embedtune.platform.auth import key_summary

    with _sessions(ctx, db, data_dir)() as s:
        rows = [key_summary(r) for r in s.scalars(select(tables.ApiKey).order_by(tables.ApiKey.created_at))]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        scope = "admin" if r["admin"] else ",".join(r["workspaces"])
        state = f"revoked {r['revoked_at']}" if r["revoked_at"] else "active"
        console.print(f"{r['id']}  {r['name']:<20} {scope:<30} {state}", soft_wrap=True, markup=False)


@keys_app.command("revoke")
@user_errors
def keys_revoke(ctx: typer.Context, key_id: Annotated[str, typer.Argument(help="the key's id (keyXXXXXXXXXXXX)")],
                db: DbOpt = None, data_dir: SubDataDirOpt = None) -> None:
    """Revoke a key: it is refused from the next request on."""
    from embedtune.platform.auth import revoke_key

    with _sessions(ctx, db, data_dir)() as s:
        row = revoke_key(s, key_id)
    if row is None:
        raise ValueError(f"no key with id {key_id!r} (see `embedtune platform keys list`)")
    console.print(f"revoked {row.id} ({row.name})", soft_wrap=True)


db_app = typer.Typer(help="The platform's database.", no_args_is_help=True)
platform_app.add_typer(db_app, name="db")


@db_app.command("upgrade")
@user_errors
def db_upgrade_cmd(
    ctx: typer.Context,
    db: Annotated[str | None, typer.Option(
        "--db", help="SQLAlchemy URL \\[default: a SQLite file in --data-dir]")] = None,
    data_dir: SubDataDirOpt = None,
    revision: Annotated[str, typer.Option(help="target revision")] = "head",
) -> None:
    """Apply the schema migrations (the service also does this when it starts)."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    from embedtune.console import console
    from embedtune.platform import PlatformSettings
    from embedtune.platform.db import upgrade

    db, data_dir = _where(ctx, db, data_dir)
    settings = PlatformSettings(db_url=db, data_dir=data_dir)
    if db is None:
        settings.prepare()
    url = settings.database_url
    try:
        at = upgrade(url, revision)
    except (OperationalError, ArgumentError, NoSuchModuleError) as exc:
        raise ValueError(f"cannot open the database {_redacted(url)}: {getattr(exc, 'orig', None) or exc}") from None
    console.print(f"database {_redacted(url)} is at revision {at}")


def _redacted(url: str) -> str:
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(unparseable URL)"
