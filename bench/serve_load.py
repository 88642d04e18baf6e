"""Load test of `embedtune serve` on loopback: dynamic batching on vs off vs one request at a time.

Starts two real servers (subprocesses; `--max-batch-tokens 1` turns batching off because every input
then forms its own batch), drives each with concurrent clients for a fixed time (and at most
--max-requests requests), and prints a Markdown table: throughput, p50/p99 latency, errors, mean batch
size (from the server's Prometheus metrics). Baselines measured in the same run: one client sending one
request at a time over HTTP, and the backend encoding one request at a time in-process (no HTTP).

    PYTHONPATH=src python bench/serve_load.py --model default --duration 12 --rounds 3 --clients 16
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import secrets
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from embedtune.serve.runner import wait_ready

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["harbour", "tides", "sailing", "boats", "wind", "rudder", "mast", "anchor", "crew", "stars",
         "planets", "galaxies", "telescope", "orbit", "comet", "recipe", "oven", "flour", "butter", "dough",
         "spices", "bonds", "markets", "inflation", "loans", "patients", "vaccine", "diagnosis", "therapy",
         "processors", "memory", "compiler", "kernel", "threads", "cache", "network"]


@dataclass
class Result:
    name: str
    clients: int
    latencies: list[float]
    errors: int
    seconds: float
    mean_batch: float | None = None

    def merge(self, other: Result) -> Result:
        return Result(self.name, self.clients, self.latencies + other.latencies, self.errors + other.errors,
                      self.seconds + other.seconds, None)

    def row(self, baseline_rps: float) -> str:
        lat = np.array(self.latencies) * 1000 if self.latencies else np.array([np.nan])
        rps = len(self.latencies) / self.seconds
        batch = f"{self.mean_batch:.1f}" if self.mean_batch else "-"
        return (f"| {self.name} | {self.clients} | {len(self.latencies)} | {rps:.1f} "
                f"| {rps / baseline_rps:.2f}x | {np.percentile(lat, 50):.1f} | {np.percentile(lat, 99):.1f} "
                f"| {self.errors} | {batch} |")


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(8, 40))) for _ in range(n)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# The servers require a key like any other; the bench makes one up and sends it.
BENCH_KEY = secrets.token_urlsafe(24)
AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}


def start_server(model: str, max_batch_tokens: int, stack: ExitStack) -> str:
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src"), "BENCH_SERVE_KEY": BENCH_KEY}
    cmd = [sys.executable, "-m", "embedtune", "serve", "--model", f"bench={model}", "--port", str(port),
           "--max-batch-tokens", str(max_batch_tokens), "--max-queue", "4096", "--api-key-env", "BENCH_SERVE_KEY"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(lambda: (proc.terminate(), proc.wait(timeout=30)))
    return f"http://127.0.0.1:{port}"


async def drive(url: str, clients: int, pool: list[str], duration: float, max_requests: int) -> Result:
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration
    issued = 0

    async def client(http: httpx.AsyncClient, seed: int) -> None:
        nonlocal errors, issued
        rng = random.Random(seed)
        while time.perf_counter() < stop_at and issued < max_requests:
            issued += 1
            body = {"model": "bench", "input": rng.choice(pool), "encoding_format": "base64"}
            started = time.perf_counter()
            try:
                response = await http.post("/v1/embeddings", json=body)
                ok = response.status_code == 200 and len(response.json()["data"]) == 1
            except httpx.HTTPError:
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    limits = httpx.Limits(max_connections=clients)
    started = time.perf_counter()
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=AUTH) as http:
        await asyncio.gather(*(client(http, i) for i in range(clients)))
    return Result("", clients, latencies, errors, time.perf_counter() - started)


def batch_counts(url: str) -> tuple[float, float]:
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(f"{url}/metrics", headers=AUTH).text)}
    samples = {s.name: s.value for s in families["embedtune_batch_size"].samples}
    return samples.get("embedtune_batch_size_count", 0.0), samples.get("embedtune_batch_size_sum", 0.0)


def measure(name: str, url: str, clients: int, pool: list[str], args) -> tuple[Result, float, float]:
    before = batch_counts(url)
    result = asyncio.run(drive(url, clients, pool, args.duration / args.rounds, args.max_requests))
    after = batch_counts(url)
    result.name = name
    print(f"  {name}: {len(result.latencies)} requests in {result.seconds:.1f}s", file=sys.stderr)
    return result, after[0] - before[0], after[1] - before[1]


def run_scenarios(scenarios: list[tuple[str, str, int]], pool: list[str], args) -> list[Result]:
    """Round-robin over the scenarios (``--rounds`` times) so a change in machine load hits all alike."""
    for _, url, clients in scenarios:
        asyncio.run(drive(url, min(clients, 4), pool, 1.0, 50))  # warm-up, not counted
    totals: dict[str, tuple[Result, float, float]] = {}
    for _ in range(args.rounds):
        for name, url, clients in scenarios:
            result, batches, inputs = measure(name, url, clients, pool, args)
            if name in totals:
                seen, b, i = totals[name]
                result, batches, inputs = seen.merge(result), b + batches, i + inputs
            totals[name] = (result, batches, inputs)
    out = []
    for result, batches, inputs in totals.values():
        result.mean_batch = inputs / batches if batches else None
        out.append(result)
    return out


def in_process_baseline(model: str, pool: list[str], args) -> Result:
    """The backend encoding one request at a time, no HTTP: what a single caller gets."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from embedtune.serve import model_entry

    backend = model_entry(model).load()
    backend.encode(pool[:4])  # warm-up
    latencies, stop_at = [], time.perf_counter() + args.duration
    started = time.perf_counter()
    while time.perf_counter() < stop_at and len(latencies) < args.max_requests:
        t = time.perf_counter()
        backend.encode([random.choice(pool)])
        latencies.append(time.perf_counter() - t)
    return Result("in-process encode, one request at a time", 1, latencies, 0, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model for `embedtune serve --model`")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per scenario (all rounds)")
    parser.add_argument("--rounds", type=int, default=2, help="round-robin passes over the scenarios")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--max-requests", type=int, default=20000, help="bound per scenario")
    parser.add_argument("--max-batch-tokens", type=int, default=16384, help="token budget with batching on")
    parser.add_argument("--out", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    pool = texts(512)
    with ExitStack() as stack:
        print("starting servers ...", file=sys.stderr)
        on = start_server(args.model, args.max_batch_tokens, stack)
        off = start_server(args.model, 1, stack)
        wait_ready(on, 300)
        wait_ready(off, 300)
        results = run_scenarios([("HTTP, one request at a time (baseline)", on, 1),
                                 ("HTTP, batching off", off, args.clients),
                                 ("HTTP, dynamic batching", on, args.clients)], pool, args)
    results.insert(0, in_process_baseline(args.model, pool, args))
    baseline_rps = len(results[1].latencies) / results[1].seconds
    lines = [f"model `{args.model}`, {args.duration:g} s per scenario in {args.rounds} interleaved rounds, "
             f"single-text requests of 8-40 words, {args.clients} clients, {os.cpu_count()} CPUs, "
             f"load average {os.getloadavg()[0]:.1f} at the end",
             "",
             "| scenario | clients | requests | req/s | vs baseline | p50 ms | p99 ms | errors "
             "| inputs/batch |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [r.row(baseline_rps) for r in results]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
