"""Service settings: where the database and the files live, how jobs are executed."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field


class PlatformSettings(BaseModel):
    db_url: str | None = Field(None, description="SQLAlchemy URL; None = SQLite file in data_dir")
    data_dir: Path = Field(Path("platform-data"), description="datasets, job run dirs, logs")
    executor: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(None, description="None starts a local Ray instance")
    max_workers: int = Field(1, ge=1, description="jobs running at once on this machine (replicas on it share them)")
    on_orphan: Literal["fail", "requeue"] = Field(
        "fail", description="what happens to a job whose worker died while nobody watched it"
    )
    max_attempts: int = Field(3, ge=1, description="requeues before an orphaned job is failed anyway")
    heartbeat_seconds: float = Field(5.0, gt=0)
    stale_after_seconds: float = Field(30.0, gt=0, description="a heartbeat older than this means dead")
    poll_seconds: float = Field(1.0, gt=0, description="scheduler tick")
    max_upload_bytes: int = Field(1 << 30, gt=0)
    max_extracted_bytes: int = Field(4 << 30, gt=0, description="archive bomb guard")
    max_archive_members: int = Field(100_000, gt=0)
    max_json_bytes: int = Field(1 << 20, gt=0, description="largest JSON request body (uploads excepted)")
    max_gateway_bytes: int = Field(16 << 20, gt=0, description="largest request forwarded by the gateway")
    max_compression_ratio: float = Field(200.0, gt=1, description="extracted/compressed bytes of an archive")
    max_upload_files: int = Field(1000, gt=0, description="files in one multipart upload")
    # --- security (SECURITY.md): every default below is the closed one
    auth: bool = Field(True, description="require an API key on every route but health")
    allow_path_registration: bool = Field(False, description="datasets/models may point at server paths")
    path_roots: list[Path] = Field(default_factory=list, description="the only folders registration may name")
    allowed_llm_base_urls: list[str] = Field(
        default_factory=list, description="sdg.llm.base_url values a job may use (exact, trailing / ignored)")
    allowed_secret_env: list[str] = Field(
        default_factory=list, description="environment variables a job may name as sdg.llm.api_key_env; "
                                          "only these reach a worker's environment")
    allowed_sdg_generators: list[str] = Field(default_factory=lambda: ["local", "llm"])
    # --- quotas per workspace (SECURITY.md): sized for one machine a team shares; 429 above them
    quota_deployments: int = Field(
        4, ge=0, description="deployments pending or ready at once (each a serving process, ~0.6 GB of RAM)")
    quota_jobs: int = Field(8, ge=0, description="customization + evaluation jobs queued or running at once")
    quota_bytes: int = Field(20 << 30, ge=0, description="bytes of datasets and job folders a workspace stores")
    deployment_host: str = "127.0.0.1"
    deployment_ready_timeout: float = Field(300.0, gt=0)

    @property
    def database_url(self) -> str:
        if self.db_url:
            return self.db_url
        return f"sqlite:///{(self.data_dir / 'platform.db').resolve()}"

    def prepare(self) -> PlatformSettings:
        self.data_dir = self.data_dir.expanduser().resolve()
        self.path_roots = [Path(os.path.realpath(p.expanduser())) for p in self.path_roots]
        for sub in ("datasets", "jobs", "deployments", "uploads"):
            (self.data_dir / sub).mkdir(parents=True, exist_ok=True)
        return self

    def to_env(self) -> dict[str, str]:
        """What a worker process needs to find the same database and files."""
        return {"EMBEDTUNE_PLATFORM_SETTINGS": self.model_dump_json()}

    @classmethod
    def from_env(cls) -> PlatformSettings:
        raw = os.environ.get("EMBEDTUNE_PLATFORM_SETTINGS")
        return cls.model_validate_json(raw) if raw else cls()
