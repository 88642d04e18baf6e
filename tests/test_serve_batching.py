"""The dynamic batcher on its own: token budget, splitting and reassembly, failures, queue bound."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from embedtune.serve.batching import Batcher, BatchStats, QueueFullError


class RecordingEmbed:
    """Fake backend: the vector of an input is [its first id, its length]; records every batch."""

    def __init__(self, delay: float = 0.0, fail_on: int | None = None):
        self.batches: list[list[list[int]]] = []
        self.delay, self.fail_on = delay, fail_on

    def __call__(self, batch):
        import time

        time.sleep(self.delay)
        self.batches.append([list(ids) for ids in batch])
        if self.fail_on is not None and any(ids[0] == self.fail_on for ids in batch):
            raise RuntimeError("backend exploded")
        return np.array([[ids[0], len(ids)] for ids in batch], dtype=np.float32)


def run(coro):
    return asyncio.run(coro)


def test_request_larger_than_budget_is_split_and_reassembled_in_order():
    embed = RecordingEmbed()

    async def scenario():
        batcher = Batcher(embed, dimension=2, max_batch_tokens=10, max_queue=8)
        await batcher.start()
        inputs = [[i] * (1 + i % 4) for i in range(12)]  # lengths 1..4, 30 tokens in all
        out = await batcher.submit(inputs)
        await batcher.stop()
        return inputs, out

    inputs, out = run(scenario())
    assert out[:, 0].tolist() == [ids[0] for ids in inputs]
    assert out[:, 1].tolist() == [len(ids) for ids in inputs]
    assert len(embed.batches) >= 3  # 30 tokens cannot fit a 10-token budget in fewer
    assert all(sum(map(len, batch)) <= 10 for batch in embed.batches)
    assert sum(len(b) for b in embed.batches) == len(inputs)


def test_an_input_longer_than_the_budget_still_runs_alone():
    embed = RecordingEmbed()

    async def scenario():
        batcher = Batcher(embed, dimension=2, max_batch_tokens=3)
        await batcher.start()
        out = await batcher.submit([[7] * 5, [8]])
        await batcher.stop()
        return out

    assert run(scenario()).tolist() == [[7, 5], [8, 1]]
    assert [len(b) for b in embed.batches] == [1, 1]


def test_concurrent_requests_share_batches_and_get_their_own_vectors():
    embed = RecordingEmbed(delay=0.05)
    sizes: list[int] = []

    async def scenario():
        batcher = Batcher(embed, dimension=2, max_batch_tokens=1000,
                          stats=BatchStats(on_batch=lambda n, t: sizes.append(n)))
        await batcher.start()
        outs = await asyncio.gather(*(batcher.submit([[100 + r, 1], [200 + r]]) for r in range(20)))
        await batcher.stop()
        return outs

    outs = run(scenario())
    for r, out in enumerate(outs):
        assert out.tolist() == [[100 + r, 2], [200 + r, 1]]
    assert sum(sizes) == 40
    assert len(sizes) < 20  # coalesced: fewer batches than requests


def test_a_failing_batch_fails_only_its_requests():
    embed = RecordingEmbed(fail_on=666)

    async def scenario():
        batcher = Batcher(embed, dimension=2, max_batch_tokens=1)  # one input per batch
        await batcher.start()
        results = await asyncio.gather(batcher.submit([[666]]), batcher.submit([[5]]), return_exceptions=True)
        await batcher.stop()
        return results

    bad, good = run(scenario())
    assert isinstance(bad, RuntimeError)
    assert good.tolist() == [[5, 1]]


def test_queue_bound_refuses_past_max_queue():
    embed = RecordingEmbed(delay=0.2)

    async def scenario():
        batcher = Batcher(embed, dimension=2, max_queue=2)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit([[i]]) for i in range(5)), return_exceptions=True)
        await batcher.stop()
        return results

    results = run(scenario())
    refused = [r for r in results if isinstance(r, QueueFullError)]
    served = [r for r in results if isinstance(r, np.ndarray)]
    assert len(refused) == 3 and len(served) == 2


def test_stop_fails_waiting_requests_instead_of_hanging():
    embed = RecordingEmbed(delay=0.3)

    async def scenario():
        batcher = Batcher(embed, dimension=2, max_batch_tokens=1)
        await batcher.start()
        task = asyncio.ensure_future(batcher.submit([[1], [2], [3]]))
        await asyncio.sleep(0.05)
        await batcher.stop()
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(task, 5)

    run(scenario())
