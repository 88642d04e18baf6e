"""What the routes share: settings, database sessions, scheduler, deployments, an HTTP client."""

from __future__ import annotations

import httpx
from sqlalchemy.orm import Session

from embedtune.platform import auth, db
from embedtune.platform.deployments import DeploymentManager
from embedtune.platform.executors import Executor
from embedtune.platform.scheduler import Scheduler
from embedtune.platform.settings import PlatformSettings

DEFAULT_WORKSPACE = "default"


class Platform:
    def __init__(self, settings: PlatformSettings):
        self.settings = settings.prepare()
        self.engine = db.make_engine(settings.database_url)
        self.sessions = db.session_factory(self.engine)
        self.deployments = DeploymentManager(settings, self.sessions)
        self.scheduler: Scheduler | None = None
        self.http: httpx.AsyncClient | None = None

    def start(self, executor: Executor) -> None:
        """``executor``: made by the caller on a thread that outlives the service (see ``create_app``)."""
        with self.sessions() as s:
            ensure_workspace(s, DEFAULT_WORKSPACE, "created by the service")
        if self.settings.auth:
            token = auth.ensure_admin_key(self.sessions, self.settings.data_dir)
            if token:
                auth.announce_admin_key(token, self.settings.data_dir / auth.ADMIN_KEY_FILE)
        self.scheduler = Scheduler(self.settings, self.sessions, executor, self.deployments)
        self.scheduler.start()
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10))

    async def stop(self) -> None:
        if self.http is not None:
            await self.http.aclose()
        if self.scheduler is not None:
            self.scheduler.shutdown()
        self.engine.dispose()


def ensure_workspace(s: Session, name: str, description: str = "") -> db.Workspace:
    ws = s.get(db.Workspace, name)
    if ws is None:
        ws = db.Workspace(name=name, description=description)
        s.add(ws)
        # Every workspace can start from the shipped default model.
        s.add(db.Model(workspace=name, name="default", kind="base", path="default",
                       description="all-MiniLM-L6-v2, shipped in a wheel (offline)"))
        s.commit()
    return ws
