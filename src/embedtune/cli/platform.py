"""`embedtune platform`: the shared REST service (datasets, models, jobs, deployments, gateway)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from embedtune.cli._app import app, user_errors

platform_app = typer.Typer()
app.add_typer(platform_app, name="platform")


@platform_app.callback(invoke_without_command=True)
@user_errors
def platform_cmd(
    ctx: typer.Context,
    db: Annotated[str | None, typer.Option(
        "--db", help="SQLAlchemy URL \\[default: a SQLite file in --data-dir]")] = None,
    data_dir: Annotated[Path, typer.Option(help="datasets, job run dirs and logs")] = Path("platform-data"),
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
) -> None:
    """Run the platform service: one process a team shares; jobs run in worker processes."""
    if ctx.invoked_subcommand is not None:
        return
    from embedtune.platform import PlatformSettings, serve

    settings = PlatformSettings(db_url=db, data_dir=data_dir, executor=executor, ray_address=ray_address,
                                max_workers=max_workers, on_orphan=on_orphan, heartbeat_seconds=heartbeat,
                                stale_after_seconds=stale_after, max_upload_bytes=max_upload_mb << 20)
    serve(settings, host=host, port=port)


db_app = typer.Typer(help="The platform's database.", no_args_is_help=True)
platform_app.add_typer(db_app, name="db")


@db_app.command("upgrade")
@user_errors
def db_upgrade_cmd(
    db: Annotated[str | None, typer.Option(
        "--db", help="SQLAlchemy URL \\[default: a SQLite file in --data-dir]")] = None,
    data_dir: Annotated[Path, typer.Option(help="the service's data folder")] = Path("platform-data"),
    revision: Annotated[str, typer.Option(help="target revision")] = "head",
) -> None:
    """Apply the schema migrations (the service also does this when it starts)."""
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError

    from embedtune.console import console
    from embedtune.platform import PlatformSettings
    from embedtune.platform.db import upgrade

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
