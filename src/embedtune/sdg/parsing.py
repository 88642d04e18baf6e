"""Tolerant extraction of JSON from model output (fenced blocks, prose around it, trailing text)."""

from __future__ import annotations

import json
import re
from typing import Any

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.DOTALL)


def extract_json(text: str) -> Any | None:
    """The first JSON object or array in ``text``; None when there is none.

    Tries, in order: the whole text, each ```json fenced block, then every ``{``/``[`` position with
    :meth:`json.JSONDecoder.raw_decode` (which stops at the end of the value, ignoring trailing prose).
    """
    text = text.strip()
    if not text:
        return None
    candidates = [text, *(m.group(1).strip() for m in _FENCE.finditer(text))]
    for cand in candidates:
        try:
            return json.loads(cand)
        except json.JSONDecodeError:
            pass
    decoder = json.JSONDecoder()
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except json.JSONDecodeError:
            continue
        if isinstance(value, dict | list):
            return value
    return None


def as_list(value: Any, key: str) -> list[Any] | None:
    """``value`` if it is a list, or ``value[key]`` if that is one (models wrap arrays either way)."""
    if isinstance(value, list):
        return value
    if isinstance(value, dict):
        inner = value.get(key)
        if isinstance(inner, list):
            return inner
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) == 1:
            return lists[0]
    return None
