"""Per-workspace quotas: what one workspace may hold of the machine the service runs on.

Set by the operator (:class:`PlatformSettings` ``quota_*``, ``embedtune platform --quota-*``); the defaults
fit one machine shared by a team. Over a quota the request is refused with 429 and an OpenAI-shaped body
whose ``param`` names the limit. Counts are read in the request's transaction: two requests racing for the
last slot may both pass (bounded by the replicas' concurrency), which a quota tolerates.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from embedtune.platform import db
from embedtune.platform.errors import PlatformError
from embedtune.platform.settings import PlatformSettings

QUEUED_OR_RUNNING = ("created", "pending", *db.ACTIVE)


def over_quota(limit: str, message: str) -> PlatformError:
    return PlatformError(429, f"{message} (the operator sets {limit})", param=limit, code="quota_exceeded")


def check_deployments(s: Session, settings: PlatformSettings, workspace: str) -> None:
    limit = settings.quota_deployments
    live = s.scalar(select(func.count()).select_from(db.Deployment).where(
        db.Deployment.workspace == workspace, db.Deployment.status.in_(db.LIVE_DEPLOYMENT)))
    if live >= limit:
        raise over_quota("quota_deployments", f"workspace '{workspace}' already runs {live} deployment(s), its "
                                              f"quota is {limit}; delete one first")


def check_jobs(s: Session, settings: PlatformSettings, workspace: str) -> None:
    limit = settings.quota_jobs
    active = s.scalar(select(func.count()).select_from(db.Job).where(
        db.Job.workspace == workspace, db.Job.status.in_(QUEUED_OR_RUNNING)))
    if active >= limit:
        raise over_quota("quota_jobs", f"workspace '{workspace}' has {active} queued or running job(s), its "
                                       f"quota is {limit}; wait for one to finish or cancel one")


def _tree_bytes(root: Path) -> int:
    total = 0
    for folder, _, names in os.walk(root, followlinks=False):
        for name in names:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:  # a file a running job just replaced
                continue
    return total


def stored_bytes(s: Session, settings: PlatformSettings, workspace: str) -> int:
    """Bytes the workspace keeps on the service's disk: its datasets' files and its jobs' folders."""
    # a registered server path is the operator's disk, not the platform's (a training set's copy is ours)
    mine = or_(db.Dataset.source == "upload", db.Dataset.format == "training")
    datasets = s.scalar(select(func.coalesce(func.sum(db.Dataset.size_bytes), 0)).where(
        db.Dataset.workspace == workspace, mine)) or 0
    job_ids = s.scalars(select(db.Job.id).where(db.Job.workspace == workspace)).all()
    return int(datasets) + sum(_tree_bytes(settings.data_dir / "jobs" / j) for j in job_ids)


def check_bytes(s: Session, settings: PlatformSettings, workspace: str, adding: int = 0) -> None:
    """Refuse when the workspace is at its quota already, or when ``adding`` more bytes would pass it."""
    limit = settings.quota_bytes
    used = stored_bytes(s, settings, workspace)
    if used + adding > limit or used >= limit:
        more = f" and this upload adds {adding:,}" if adding else ""
        raise over_quota("quota_bytes", f"workspace '{workspace}' stores {used:,} bytes{more}; its quota is "
                                        f"{limit:,} bytes: delete datasets or jobs first")
