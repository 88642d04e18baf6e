"""Training progress the finetune stage publishes and a driver subscribes to, neither importing the other.

The platform worker records steps, epochs and losses on its job while the stage trains; the stage only
publishes (a no-op when nobody listens). Listeners are scoped by :func:`listening`, so a process running two
pipelines in two threads or tasks keeps their reports apart, and nothing global (transformers'
``DEFAULT_CALLBACKS``) is changed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class TrainingEvent:
    kind: Literal["begin", "step", "log"]  # training starts (or resumes) / an optimizer step ends / losses logged
    step: int
    max_steps: int
    epoch: float
    num_epochs: float
    logs: dict[str, float] = field(default_factory=dict)  # with kind "log": e.g. loss, eval_loss


Listener = Callable[[TrainingEvent], None]
_listeners: ContextVar[tuple[Listener, ...]] = ContextVar("embedtune_training_listeners", default=())


@contextlib.contextmanager
def listening(listener: Listener) -> Iterator[None]:
    """Within the block, ``listener`` receives every :class:`TrainingEvent` published in this context."""
    token = _listeners.set((*_listeners.get(), listener))
    try:
        yield
    finally:
        _listeners.reset(token)


def publish(event: TrainingEvent) -> None:
    for listener in _listeners.get():
        listener(event)
