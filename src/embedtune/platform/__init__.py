"""The embedtune platform: a REST service that runs the pipeline as jobs (NeMo Customizer without Kubernetes).

``embedtune platform [--db URL] [--data-dir DIR] [--host H --port P] [--executor local|ray]`` starts one
service a team shares; :func:`create_app` builds the FastAPI app; :func:`serve` runs it with uvicorn.
The OpenAPI spec is served at ``/openapi.json`` (interactive docs at ``/docs``).

Every route but health needs an API key (``Authorization: Bearer``); the first start creates an admin key,
prints it once and writes it to ``DATA_DIR/admin.key`` (0600). ``embedtune platform keys create`` makes more.
Quick start (``embedtune.platform.client.PlatformClient`` wraps the same calls; ``-H "$AUTH"`` on each)::

    AUTH="Authorization: Bearer $(cat platform-data/admin.key)"
    curl -F name=docs -F format=corpus -F files=@docs.tar.gz  $URL/v2/workspaces/default/datasets
    curl -H 'content-type: application/json' $URL/v2/workspaces/default/customization/jobs \
         -d '{"model": "default", "dataset": "docs", "hyperparameters": {"epochs": 1}, "output": {"name": "ft"}}'
    curl $URL/v2/workspaces/default/customization/jobs/$JOB          # status, status_details, error
    curl -d '{"model": "ft"}' -H 'content-type: application/json' $URL/v2/workspaces/default/deployments
    # then any OpenAI client with base_url=$URL/v2/workspaces/default/inference/gateway/model/ft/-/v1

Layout: ``db`` (tables, compare-and-set status transitions), ``jobs`` (request bodies -> recipe),
``datasets`` (safe extraction, validation), ``executors`` (local subprocess, Ray), ``scheduler`` (launch,
reap, recover), ``worker`` (runs one job), ``evaluation``, ``deployments``, ``auth`` (keys, access, audit),
``sandbox`` (what a job or registration may touch), ``routes/`` (one module per router), ``app`` (assembly).
See SECURITY.md for the threat model and the operator settings.
"""

from __future__ import annotations

from embedtune.platform.settings import PlatformSettings

__all__ = ["PlatformSettings", "create_app", "serve"]


def create_app(settings: PlatformSettings | None = None):  # noqa: ANN201
    from embedtune.platform.app import create_app as _create

    return _create(settings)


def serve(settings: PlatformSettings, host: str = "127.0.0.1", port: int = 8080, log_level: str = "info") -> None:
    import uvicorn

    from embedtune.platform.auth import check_auth_setting

    check_auth_setting(settings.auth, host)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
