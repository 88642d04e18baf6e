"""Benchmark: what the platform's inference gateway adds to an embeddings request.

Starts `embedtune platform` on a temporary data folder, deploys the shipped default model, then sends the
same requests (8 short texts each) alternately straight to the deployment and through the gateway
(`/v2/workspaces/default/inference/gateway/model/default/-/v1/embeddings`, API key checked), interleaved so
load changes hit both alike. Prints latency percentiles and the gateway/direct ratio. Also prints how long a
job takes from POST to a running worker with a recorded pid (the scheduler's latency).

    PYTHONPATH=src .venv/bin/python bench/platform_gateway.py [--requests 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from embedtune.platform.client import PlatformClient

TEXTS = [f"sentence number {i} about sails, tides and harbours" for i in range(8)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout: float, what: str):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with_value = predicate()
        if with_value:
            return with_value
        time.sleep(0.05)
    raise TimeoutError(what)


def percentiles(ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=20)
    return f"mean {statistics.fmean(ms):7.2f} ms  p50 {statistics.median(ms):7.2f}  p95 {q[18]:7.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200)
    args = ap.parse_args()
    data = Path(tempfile.mkdtemp(prefix="platform-bench-"))
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    service = subprocess.Popen([sys.executable, "-m", "embedtune", "platform", "--data-dir", str(data), "--port",
                                str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    dep = pc = None
    try:
        wait(lambda: _ok(f"{url}/v1/health/ready"), 120, "service ready")
        key = (data / "admin.key").read_text().strip()  # written by the service on its first start
        pc = PlatformClient(url, api_key=key)
        folder = data / "docs"
        folder.mkdir()
        (folder / "a.txt").write_text("Boats need wind in their sails to cross the harbour before the tide turns.")
        pc.upload_dataset("docs", folder)
        t0 = time.perf_counter()
        job = pc.create_customization_job(model="default", dataset="docs", stages=["corpus"])
        wait(lambda: pc.get_job(job["id"])["worker"]["pid"], 60, "worker started")
        started = time.perf_counter() - t0
        pc.wait_job(job["id"], timeout=600)
        dep = pc.wait_deployment(pc.create_deployment("default", name="bench")["name"], timeout=600)
        direct = httpx.Client(base_url=dep["url"], timeout=60)
        gateway = httpx.Client(base_url=pc.gateway_url(model="default").removesuffix("/v1"), timeout=60,
                               headers={"Authorization": f"Bearer {key}"})  # the gateway checks the platform key
        body = {"model": "default", "input": TEXTS, "encoding_format": "float"}
        for client in (direct, gateway):  # warm-up
            client.post("/v1/embeddings", json=body).raise_for_status()
        times: dict[str, list[float]] = {"direct": [], "gateway": []}
        for _ in range(args.requests):
            for name, client in (("direct", direct), ("gateway", gateway)):
                t = time.perf_counter()
                client.post("/v1/embeddings", json=body).raise_for_status()
                times[name].append((time.perf_counter() - t) * 1000)
        print(f"job POST -> worker running with pid: {started * 1000:.0f} ms")
        print(f"{args.requests} requests x {len(TEXTS)} texts, default model (all-MiniLM-L6-v2), interleaved:")
        for name, ms in times.items():
            print(f"  {name:8s} {percentiles(ms)}")
        ratio = statistics.median(times["gateway"]) / statistics.median(times["direct"])
        extra = statistics.median(times["gateway"]) - statistics.median(times["direct"])
        print(f"  gateway/direct median ratio {ratio:.2f} (+{extra:.2f} ms per request)")
    finally:
        if dep is not None and pc is not None:
            pc.delete_deployment("bench")
        service.send_signal(signal.SIGTERM)
        service.wait(30)
        shutil.rmtree(data, ignore_errors=True)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


if __name__ == "__main__":
    main()
