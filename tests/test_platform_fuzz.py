"""Schemathesis over the platform's own OpenAPI spec (ASGI, in process): no generated request gets a 5xx, and
every error is OpenAI-shaped. Bounded (a few examples per operation) and in the slow suite.

Jobs are recorded but never launched (the scheduler is stopped) and deployments start no process: the fuzz is
about the API's handling of input, not about running the pipeline on random recipes.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from embedtune.platform import PlatformSettings, create_app

pytestmark = pytest.mark.slow
# The schema is loaded at collection time (schemathesis.pytest.from_fixture does not work with this pytest);
# create_app only creates the folder and the database file. Schemathesis runs the app's lifespan itself.
DATA_DIR = Path(tempfile.mkdtemp(prefix="embedtune-fuzz-")) / "data"
atexit.register(shutil.rmtree, DATA_DIR.parent, True)
APP = create_app(PlatformSettings(data_dir=DATA_DIR, max_upload_bytes=1 << 20))
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


def _start_without_launching(executor, start=APP.state.platform.start) -> None:  # noqa: ANN001
    start(executor)
    state = APP.state.platform
    state.scheduler.shutdown()
    state.scheduler = None  # jobs stay pending: nothing is launched
    state.deployments.start = lambda dep: None  # and no serving process is started


APP.state.platform.start = _start_without_launching


EXAMPLES = int(os.environ.get("EMBEDTUNE_FUZZ_EXAMPLES", "12"))  # per operation; CI keeps the default


def admin_key() -> dict[str, str]:
    return {"Authorization": f"Bearer {(DATA_DIR / 'admin.key').read_text().strip()}"}


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_platform_api_never_answers_5xx(case):
    case.headers = {**(case.headers or {}), **admin_key()}  # over any generated Authorization
    resp = case.call()
    assert resp.status_code < 500, (case.method, case.formatted_path, resp.status_code, resp.text[:500])
    if resp.status_code >= 400:
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}, resp.text[:500]


class PlatformWorkflow(schema.as_state_machine()):
    """The stateful phase: sequences along the links schemathesis infers (create -> get/cancel/delete ...),
    in the service's default workspace so that created things are found again."""

    def before_call(self, case) -> None:  # noqa: ANN001
        if case.path_parameters and "workspace" in case.path_parameters:
            case.path_parameters["workspace"] = "default"
        case.headers = {**(case.headers or {}), **admin_key()}  # over any generated Authorization

    def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:  # noqa: ANN001
        assert response.status_code < 500, (case.method, case.formatted_path, response.status_code,
                                             response.text[:500])
        if response.status_code >= 400:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text[:500]


TestPlatformWorkflow = PlatformWorkflow.TestCase
TestPlatformWorkflow.settings = settings(max_examples=EXAMPLES, stateful_step_count=8, deadline=None,
                                         suppress_health_check=list(HealthCheck))
