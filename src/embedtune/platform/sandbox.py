"""What a platform user may make the service touch: server paths, outbound URLs, environment variables.

- Registration of server paths is off unless the operator turns it on, and then only under the configured
  roots (symlinks resolved first). A refused path and a missing path get the same answer.
- A job's ``recipe`` may not name a server path outside the caller's own workspace folders, an LLM endpoint
  the operator did not allow, an environment variable the operator did not list as a secret for jobs, or an
  SDG generator plug-in the operator did not allow. Paths the platform sets itself (the model folder, the
  corpus, the validation set) come from the request's references, never from ``recipe``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from embedtune.platform.errors import PlatformError
from embedtune.platform.settings import PlatformSettings

# recipe keys the platform fills from the request's references (the user names a dataset/model instead)
PLATFORM_SET = {"model.name": "model", "corpus.path": "dataset", "eval.dataset": "dataset.validation"}
# recipe keys that name a server path: allowed only inside the job's own workspace's folders
PATH_KEYS = ("eval.queries", "eval.cache_dir", "sdg.local.model_path")
# recipe sections platform jobs never use (the serving settings belong to deployments)
FORBIDDEN_SECTIONS = ("serve",)
# recipe keys that name an outbound store or an environment variable: a job's index is Milvus Lite in its own
# run folder; pointing it at a server (and a token variable) is the operator's deployment decision
OPERATOR_KEYS = ("index.uri", "index.token_env")


def is_under(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
    except ValueError:
        return False
    return True


def real_path(raw: str) -> Path | None:
    if not raw or len(raw) > 4096 or "\x00" in raw:
        return None
    return Path(os.path.realpath(os.path.expanduser(raw)))


def registrable_path(settings: PlatformSettings, raw: str) -> Path:
    """The resolved server path a dataset/model registration may use, or a 403/422 that reveals nothing."""
    if not settings.allow_path_registration:
        raise PlatformError(403, "this service does not accept server paths; upload the files instead",
                            param="path", code="path_registration_disabled")
    path = real_path(raw)
    if path is None or not any(is_under(path, root) for root in settings.path_roots) or not path.exists():
        raise PlatformError(422, "the path cannot be registered: it must be an existing file or folder under "
                                 "one of the service's registration roots", param="path", code="path_not_allowed")
    return path


def _get(data: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def refuse(param: str, message: str, code: str = "not_allowed") -> PlatformError:
    return PlatformError(422, message, param=f"recipe.{param}", code=code)


def check_recipe(user: dict[str, Any], final: dict[str, Any], settings: PlatformSettings,
                 owned: Callable[[Path], bool]) -> None:
    """Refuse a recipe that reaches outside the job's sandbox.

    ``user`` is what the request's ``recipe`` set, ``final`` the validated recipe the worker would run,
    ``owned(path)`` whether a resolved path lies in a folder of the job's own workspace.
    """
    for section in FORBIDDEN_SECTIONS:
        if section in user:
            raise refuse(section, f"the '{section}' section cannot be set on a platform job")
    for key, field in PLATFORM_SET.items():
        if _get(user, key)[0]:
            raise refuse(key, f"{key} is set by the platform; name a registered {field.split('.')[0]} in "
                              f"'{field}' instead", code="platform_managed")
    for key in OPERATOR_KEYS:
        given, value = _get(user, key)
        if given and value is not None:
            raise refuse(key, f"{key} cannot be set on a platform job: its index stays in the job's own folder")
    for key in PATH_KEYS:
        given, value = _get(user, key)
        if given and value is not None:
            path = real_path(str(value))
            inside = path is not None and is_under(path, settings.data_dir) and owned(path)
            if not inside:
                raise refuse(key, f"{key} must name a folder of this workspace's datasets or jobs",
                             code="path_not_allowed")
    _check_generator(user, final, settings)


def normalise_url(url: str) -> str:
    return url.strip().rstrip("/")


def _check_generator(user: dict[str, Any], final: dict[str, Any], settings: PlatformSettings) -> None:
    sdg = final.get("sdg", {})
    generator = sdg.get("generator")
    if generator not in settings.allowed_sdg_generators:
        raise refuse("sdg.generator", "this SDG generator is not enabled on this service (enabled: "
                                      f"{', '.join(settings.allowed_sdg_generators) or 'none'})")
    llm = sdg.get("llm", {})
    allowed_urls = {normalise_url(u) for u in settings.allowed_llm_base_urls}
    url_given = _get(user, "sdg.llm.base_url")[0]
    if (url_given or generator == "llm") and normalise_url(str(llm.get("base_url", ""))) not in allowed_urls:
        raise refuse("sdg.llm.base_url", "this LLM endpoint is not on the service's allow-list "
                                         "(the operator sets --allow-llm-url)")
    env_given = _get(user, "sdg.llm.api_key_env")[0]
    if (env_given or generator == "llm") and llm.get("api_key_env") not in settings.allowed_secret_env:
        raise refuse("sdg.llm.api_key_env", "this secret is not one the service passes to jobs "
                                            "(the operator sets --allow-secret)")
