"""Each model deployment's API key: where it lives and how the gateway and evaluations read it.

Below the deployment manager (which writes the key when it starts a server) and its readers (the gateway,
an evaluation job scoring a deployment), so that neither reader imports the manager.
"""

from __future__ import annotations

import functools
from pathlib import Path

KEY_FILE = "serve.key"


def key_path(data_dir: Path, dep_id: str) -> Path:
    return data_dir / "deployments" / dep_id / KEY_FILE


@functools.lru_cache(maxsize=1024)
def _read_key(path: Path) -> str | None:
    # Read once per deployment, not on every gateway request: a deployment's key never changes (ids are random).
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def deployment_key(data_dir: Path, dep_id: str) -> str | None:
    """The deployment's API key; None for one started before deployments had keys."""
    return _read_key(key_path(data_dir, dep_id))


def auth_headers(data_dir: Path, dep_id: str) -> dict[str, str]:
    """The Authorization header for a deployment's server (none for a key-less one)."""
    key = deployment_key(data_dir, dep_id)
    return {"Authorization": f"Bearer {key}"} if key else {}
