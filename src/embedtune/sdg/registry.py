"""The generators ``sdg.generator`` can name: the built-in ``local`` and ``llm`` ones and any plug-in registered
with :func:`register_generator` (see :mod:`embedtune.sdg.base` for the interface)."""

from __future__ import annotations

from collections.abc import Callable

from embedtune.sdg.base import Generator, SdgError

GeneratorFactory = Callable[..., Generator]
_REGISTRY: dict[str, GeneratorFactory] = {}


def register_generator(name: str, cls: GeneratorFactory) -> None:
    """Make ``cls`` selectable as ``sdg.generator: <name>``; called as ``cls(recipe, cache, workdir)``."""
    _REGISTRY[name] = cls


def generator_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get_generator(name: str) -> GeneratorFactory:
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        names = ", ".join(sorted(_REGISTRY))
        raise SdgError(f"unknown sdg.generator {name!r}; registered: {names}") from None


def _load_builtins() -> None:
    # Imported lazily: the llm generator needs `openai`, the local one `transformers`.
    if "local" not in _REGISTRY:
        from embedtune.sdg.local import LocalGenerator

        _REGISTRY.setdefault("local", LocalGenerator)
    if "llm" not in _REGISTRY:
        from embedtune.sdg.llm import LLMGenerator

        _REGISTRY.setdefault("llm", LLMGenerator)
