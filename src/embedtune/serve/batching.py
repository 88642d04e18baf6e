"""Dynamic batching: concurrent requests share forward passes, bounded by a token budget.

Every input of every admitted request joins one FIFO of items. A single worker task takes items off the
front until the next one would exceed ``max_batch_tokens`` (a batch always holds at least one item), runs
the backend in a worker thread so the event loop keeps accepting requests, and hands each vector back to
its request. Requests that arrive while a batch is running wait for the next one: that is where
coalescing comes from, without adding a fixed delay to a lone request. A request larger than the budget
is simply spread over several batches and reassembled in order.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

EmbedFn = Callable[[Sequence[Sequence[int]]], np.ndarray]


class QueueFullError(RuntimeError):
    """More requests are waiting than ``max_queue`` allows."""


class ShuttingDownError(RuntimeError):
    """The server is stopping; the request was not encoded."""


@dataclass
class _Job:
    future: asyncio.Future
    out: np.ndarray
    remaining: int


@dataclass
class _Item:
    job: _Job
    position: int
    ids: Sequence[int]


@dataclass
class BatchStats:
    """Hooks for metrics: called once per batch and whenever the queue changes."""

    on_batch: Callable[[int, int], None] = lambda n_inputs, n_tokens: None
    on_queue: Callable[[int, int], None] = lambda n_requests, n_inputs: None


@dataclass
class Batcher:
    embed: EmbedFn
    dimension: int
    max_batch_tokens: int = 16384
    max_queue: int = 256
    stats: BatchStats = field(default_factory=BatchStats)
    _items: deque[_Item] = field(default_factory=deque, init=False)
    _running: list[_Item] = field(default_factory=list, init=False)
    _pending: int = field(default=0, init=False)
    _wake: asyncio.Event | None = field(default=None, init=False)
    _task: asyncio.Task | None = field(default=None, init=False)
    _executor: ThreadPoolExecutor | None = field(default=None, init=False)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        # One thread: the backend already uses every core per batch; two batches at once would only
        # compete for them (and torch / onnxruntime sessions are not meant to be driven concurrently).
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed")
        self._task = asyncio.create_task(self._run(), name="batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for item in [*self._running, *self._items]:
            if not item.job.future.done():
                item.job.future.set_exception(ShuttingDownError("the server is shutting down"))
        self._items.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    @property
    def pending_requests(self) -> int:
        return self._pending

    async def submit(self, token_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Full-width embeddings of one request's inputs, in order."""
        if self._wake is None:
            raise ShuttingDownError("the batcher is not running")
        if self._pending >= self.max_queue:
            raise QueueFullError(f"the server queue is full ({self.max_queue} requests waiting); retry later")
        job = _Job(asyncio.get_running_loop().create_future(),
                   np.empty((len(token_ids), self.dimension), dtype=np.float32), len(token_ids))
        self._items.extend(_Item(job, i, ids) for i, ids in enumerate(token_ids))
        self._pending += 1
        self._report_queue()
        self._wake.set()
        try:
            return await job.future
        finally:
            self._pending -= 1
            self._report_queue()

    def _report_queue(self) -> None:
        self.stats.on_queue(self._pending, len(self._items))

    def _take_batch(self) -> list[_Item]:
        batch: list[_Item] = []
        tokens = 0
        while self._items:
            item = self._items[0]
            if item.job.future.done():  # its client went away, or an earlier batch of it failed
                self._items.popleft()
                continue
            if batch and tokens + len(item.ids) > self.max_batch_tokens:
                break
            batch.append(self._items.popleft())
            tokens += len(item.ids)
        return batch

    async def _run(self) -> None:
        assert self._wake is not None
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while batch := self._take_batch():
                self._running = batch
                self._report_queue()
                ids = [item.ids for item in batch]
                try:
                    vectors = await loop.run_in_executor(self._executor, self.embed, ids)
                except Exception as exc:  # noqa: BLE001 - the failure belongs to these requests only
                    for item in batch:
                        if not item.job.future.done():
                            item.job.future.set_exception(exc)
                    continue
                finally:
                    self._running = []
                self.stats.on_batch(len(batch), sum(len(i) for i in ids))
                self._deliver(batch, vectors)

    @staticmethod
    def _deliver(batch: list[_Item], vectors: np.ndarray) -> None:
        for item, vector in zip(batch, vectors, strict=True):
            job = item.job
            if job.future.done():
                continue
            job.out[item.position] = vector
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.out)
