"""What a platform user may make the service touch: server paths, outbound URLs, environment variables.

- Registration of server paths is off unless the operator turns it on, and then only under the configured
  roots (symlinks resolved first). A refused path and a missing path get the same answer.
- A job's ``recipe`` is checked against an **allow-list** that lives in the recipe schema itself
  (:mod:`embedtune.config`: each field's ``tenant`` declaration). A field that declares nothing is refused,
  so a recipe key added later is closed to tenants until someone opens it on purpose. A tenant never names a
  server path: a field that needs one either is set by the platform from the request's references, or takes
  the *name* of a dataset of the job's workspace, which the platform resolves to its folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from embedtune.config import TENANT, Recipe
from embedtune.platform.errors import PlatformError
from embedtune.platform.settings import PlatformSettings


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


def field_policy(info: FieldInfo) -> dict[str, Any]:
    """A field's tenant declaration; ``closed`` (and ``declared: False``) when it declares nothing."""
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if TENANT not in extra:
        return {TENANT: "closed", "declared": False}
    return {**extra, "declared": True}


def section_of(info: FieldInfo) -> type[BaseModel] | None:
    """The section model a field holds, to walk into; None for a setting, or a section declared closed whole."""
    ann = info.annotation
    if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
        return None
    return None if field_policy(info)["declared"] and field_policy(info)[TENANT] == "closed" else ann


def leaves(model: type[BaseModel] = Recipe, prefix: str = "") -> Iterator[tuple[str, FieldInfo]]:
    """(dotted key, field) of every setting of the schema; sections are walked, not listed."""
    for name, info in model.model_fields.items():
        sub = section_of(info)
        if sub is not None:
            yield from leaves(sub, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", info


def refuse(param: str, message: str, code: str = "not_allowed") -> PlatformError:
    return PlatformError(422, message, param=f"recipe.{param}", code=code)


# The operator's lists an ``allowed`` field may name: (PlatformSettings attribute, how values compare, message).
ALLOW_LISTS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "allowed_sdg_generators": (str, "this SDG generator is not enabled on this service (enabled: {listed})"),
    "allowed_llm_base_urls": (lambda u: normalise_url(str(u)),
                              "this LLM endpoint is not on the service's allow-list (the operator sets "
                              "--allow-llm-url)"),
    "allowed_secret_env": (str, "this secret is not one the service passes to jobs (the operator sets "
                                "--allow-secret)"),
}

DATASET_REF = re.compile(r"([A-Za-z0-9][A-Za-z0-9_.-]{0,127}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,255}")
# Resolves a dataset reference of the job's workspace: (reference, param, accepted formats) -> its folder.
DatasetResolver = Callable[[str, str, list[str]], str]


def check_recipe(user: Any, settings: PlatformSettings, resolve_dataset: DatasetResolver,
                 schema: type[BaseModel] = Recipe) -> dict[str, Any]:
    """Refuse any key of the request's ``recipe`` a tenant may not set; return the values the platform
    resolved for it (``{dotted key: server path}`` of dataset references).

    Unknown keys are left to the recipe's validation, which names them with the closest valid key.
    """
    resolved: dict[str, Any] = {}
    _walk(user, schema, "", settings, resolve_dataset, resolved)
    return resolved


def _walk(node: Any, model: type[BaseModel], prefix: str, settings: PlatformSettings,
          resolve_dataset: DatasetResolver, resolved: dict[str, Any]) -> None:
    if not isinstance(node, dict):
        where = prefix.rstrip(".")
        raise PlatformError(422, f"recipe{'.' + where if where else ''} must be an object (a section of keys), "
                                 f"not {type(node).__name__}", param=f"recipe{'.' + where if where else ''}",
                            code="invalid_value")
    for key, value in node.items():
        info = model.model_fields.get(key) if isinstance(key, str) else None
        if info is None:
            continue
        dotted, policy, sub = f"{prefix}{key}", field_policy(info), section_of(info)
        if sub is not None:
            _walk(value, sub, f"{dotted}.", settings, resolve_dataset, resolved)
            continue
        kind = policy[TENANT]
        if kind == "value":
            continue  # type and range: the recipe's validation
        if kind == "allowed":
            _check_allowed(dotted, value, policy, settings)
        elif kind == "dataset":
            if value is not None:
                if not isinstance(value, str) or not DATASET_REF.fullmatch(value):
                    raise refuse(dotted, f"{dotted} takes the name of a dataset of this workspace",
                                 code="invalid_value")
                resolved[dotted] = resolve_dataset(value, f"recipe.{dotted}", list(policy.get("formats") or []))
        elif kind == "platform":
            raise refuse(dotted, f"{dotted} is set by the platform; give '{policy.get('via')}' in the request "
                                 "instead", code="platform_managed")
        else:  # closed, declared or not, and any kind this module does not know
            raise refuse(dotted, f"{dotted} cannot be set on a platform job: it is not on the recipe's allow-list "
                                 "for tenants (it names a server path, an outbound address, an environment "
                                 "variable or an operator setting)")


def _check_allowed(dotted: str, value: Any, policy: dict[str, Any], settings: PlatformSettings) -> None:
    setting = str(policy.get("setting"))
    listed = getattr(settings, setting, None)
    if setting not in ALLOW_LISTS or not isinstance(listed, list):
        raise refuse(dotted, f"{dotted} cannot be set on a platform job")
    norm, message = ALLOW_LISTS[setting]
    if norm(value) not in {norm(v) for v in listed}:
        raise refuse(dotted, message.format(listed=", ".join(map(str, listed)) or "none"))


def check_final(final: dict[str, Any], settings: PlatformSettings, schema: type[BaseModel] = Recipe) -> None:
    """The job's own values of ``allowed`` fields (defaults included) wherever their ``used_when`` holds:
    a default the job will use is held to the same list as a value the user set."""
    for dotted, info in leaves(schema):
        policy = field_policy(info)
        if policy[TENANT] != "allowed":
            continue
        conditions = policy.get("used_when") or {}
        if all(_get(final, key)[1] == want for key, want in conditions.items()):
            given, value = _get(final, dotted)
            if given:
                _check_allowed(dotted, value, policy, settings)


def normalise_url(url: str) -> str:
    return url.strip().rstrip("/")
