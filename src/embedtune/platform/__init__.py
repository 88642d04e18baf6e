"""The embedtune platform: a REST service that runs the pipeline as jobs (NeMo Customizer without Kubernetes).

``embedtune platform`` starts it; :func:`create_app` builds the FastAPI app for embedding or tests;
:func:`serve` runs it with uvicorn.
"""

from __future__ import annotations

from embedtune.platform.settings import PlatformSettings

__all__ = ["PlatformSettings", "create_app", "serve"]


def create_app(settings: PlatformSettings | None = None):  # noqa: ANN201
    from embedtune.platform.app import create_app as _create

    return _create(settings)


def serve(settings: PlatformSettings, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
