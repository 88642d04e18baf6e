"""Benchmark: the platform's job API under load, on SQLite and on PostgreSQL.

For each database, starts `embedtune platform` (``--replicas`` processes on one database and one data folder,
requests spread over them), then ``--clients`` concurrent clients (default 32) repeat for ``--seconds`` each:
create a corpus job, list the pending jobs, cancel the job, read it back. Prints requests/s, latency
percentiles per request kind, errors (anything but the expected 2xx; goal 0), and whether every job a client
was told was created is recorded in the database and ends cancelled. PostgreSQL's figures are printed as ratios
to SQLite's, measured in the same run. Bounded: a few seconds of load per database; figures on a shared
machine are indicative only.

PostgreSQL is a throwaway cluster started like the tests' (tests/pg_fixture.py), or ``--pg-url`` (the bench
writes jobs to that database).

    PYTHONPATH=src .venv/bin/python bench/platform_load.py [--seconds 15] [--clients 32] [--replicas 1]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, func, select

from embedtune.platform import db
from embedtune.platform.client import PlatformClient

TESTS = Path(__file__).resolve().parents[1] / "tests"
WS = "/v2/workspaces/default/customization/jobs"
JOB = {"model": "default", "dataset": "docs", "stages": ["corpus"]}
EXPECTED = {"create": 201, "list": 200, "cancel": 200, "get": 200}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait(predicate, timeout: float, what: str):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise TimeoutError(what)


def ready(url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{url}/v1/health/ready", timeout=2).status_code == 200
    return False


class Services:
    """``n`` platform processes on one database and one data folder."""

    def __init__(self, db_url: str, data_dir: Path, n: int):
        self.db_url, self.data_dir = db_url, data_dir
        self.procs: list[subprocess.Popen] = []
        self.urls: list[str] = []
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        for _ in range(n):
            port = free_port()
            cmd = [sys.executable, "-m", "embedtune", "platform", "--db", db_url, "--data-dir", str(data_dir),
                   "--port", str(port), "--max-workers", "1"]
            log = (data_dir.parent / f"service-{port}.log").open("ab")
            self.procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT))
            self.urls.append(f"http://127.0.0.1:{port}")
        for url in self.urls:
            wait(lambda u=url: ready(u), 180, f"{url} ready")

    @property
    def admin_key(self) -> str:
        return (self.data_dir / "admin.key").read_text().strip()

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
            if proc.poll() is None:
                proc.kill()
        engine = create_engine(self.db_url)
        with engine.connect() as conn:
            pids = conn.execute(select(db.Job.worker_pid).where(db.Job.worker_pid.is_not(None))).scalars().all()
        engine.dispose()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


class Load:
    """The clients' shared tally."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latency: dict[str, list[float]] = collections.defaultdict(list)
        self.errors: collections.Counter[str] = collections.Counter()
        self.created: list[str] = []

    def record(self, kind: str, seconds: float, ok: bool, detail: str = "") -> None:
        with self.lock:
            self.latency[kind].append(seconds * 1000)
            if not ok:
                self.errors[f"{kind}: {detail}"[:160]] += 1


def client_loop(base_url: str, load: Load, stop: threading.Event, key: str) -> None:
    with httpx.Client(base_url=base_url, timeout=120, headers={"Authorization": f"Bearer {key}"}) as http:

        def call(kind: str, method: str, url: str, **kw) -> httpx.Response | None:  # noqa: ANN003
            t0 = time.perf_counter()
            try:
                r = http.request(method, url, **kw)
            except httpx.HTTPError as exc:
                load.record(kind, time.perf_counter() - t0, False, type(exc).__name__)
                return None
            ok = r.status_code == EXPECTED[kind]
            load.record(kind, time.perf_counter() - t0, ok, f"{r.status_code} {r.text[:100]}")
            return r if ok else None

        while not stop.is_set():
            r = call("create", "POST", WS, json=JOB)
            if r is None:
                continue
            job_id = r.json()["id"]
            with load.lock:
                load.created.append(job_id)
            call("list", "GET", WS, params={"status": "pending"})
            call("cancel", "POST", f"{WS}/{job_id}/cancel")
            call("get", "GET", f"{WS}/{job_id}")


def settle(db_url: str, ids: list[str], timeout: float = 120) -> collections.Counter[str]:
    """Statuses of the recorded jobs once none is in flight (a claimed job ends when its worker does)."""
    engine = create_engine(db_url)
    try:
        def statuses() -> collections.Counter[str]:
            with engine.connect() as conn:
                rows = conn.execute(select(db.Job.status, func.count()).where(db.Job.id.in_(ids))
                                    .group_by(db.Job.status)).all()
            return collections.Counter(dict(rows))

        with contextlib.suppress(TimeoutError):
            wait(lambda: not (set(statuses()) & {"created", "pending", "running", "cancelling"}), timeout, "settled")
        return statuses()
    finally:
        engine.dispose()


def run(name: str, db_url: str, root: Path, args: argparse.Namespace) -> dict:
    data = root / name / "data"
    data.mkdir(parents=True)
    services = Services(db_url, data, args.replicas)
    try:
        docs = root / name / "docs"
        docs.mkdir()
        (docs / "a.txt").write_text("Boats need wind in their sails to cross the harbour before the tide turns.")
        PlatformClient(services.urls[0], api_key=services.admin_key).upload_dataset("docs", docs)
        load, stop = Load(), threading.Event()
        threads = [threading.Thread(target=client_loop, args=(services.urls[i % len(services.urls)], load, stop,
                                                                  services.admin_key))
                   for i in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        time.sleep(args.seconds)
        stop.set()
        for t in threads:
            t.join(180)
        elapsed = time.perf_counter() - t0
        final = settle(db_url, load.created)
    finally:
        services.stop()
    all_ms = [ms for v in load.latency.values() for ms in v]
    result = {"name": name, "requests": len(all_ms), "rps": len(all_ms) / elapsed, "elapsed": elapsed,
              "p50": statistics.median(all_ms), "p99": quantile(all_ms, 0.99), "errors": load.errors,
              "created": len(load.created), "recorded": sum(final.values()), "final": final,
              "by_kind": {k: (len(v), statistics.median(v), quantile(v, 0.99)) for k, v in load.latency.items()}}
    report(result)
    return result


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(r: dict) -> None:
    print(f"\n== {r['name']}: {r['requests']} requests in {r['elapsed']:.1f} s = {r['rps']:.1f} req/s, "
          f"p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, errors {sum(r['errors'].values())}")
    for kind, (n, p50, p99) in r["by_kind"].items():
        print(f"   {kind:7s} n={n:5d}  p50 {p50:7.1f} ms  p99 {p99:7.1f} ms")
    for what, n in r["errors"].most_common(5):
        print(f"   error x{n}: {what}")
    same = "OK" if r["created"] == r["recorded"] else "MISMATCH"
    print(f"   jobs created (201) {r['created']}, recorded {r['recorded']} [{same}]; final statuses {dict(r['final'])}")


def postgres_url(args: argparse.Namespace):  # noqa: ANN201
    """(url, server to stop or None); (None, None) with the reason printed when there is no PostgreSQL."""
    if args.pg_url:
        return args.pg_url, None
    sys.path.insert(0, str(TESTS))
    from pg_fixture import PostgresUnavailable, start_throwaway_postgres

    try:
        server = start_throwaway_postgres()
    except PostgresUnavailable as exc:
        print(f"PostgreSQL skipped: {exc}")
        return None, None
    return server.create_database("bench"), server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=15, help="load per database")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--replicas", type=int, default=1, help="platform processes per database")
    ap.add_argument("--pg-url", default=None, help="an existing PostgreSQL database (default: a throwaway one)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="platform-load-"))
    server = None
    try:
        base = run("sqlite", f"sqlite:///{root / 'platform.db'}", root, args)
        url, server = postgres_url(args)
        if url:
            pg = run("postgres", url, root, args)
            print(f"\npostgres / sqlite: req/s x{pg['rps'] / base['rps']:.2f}, p99 x{pg['p99'] / base['p99']:.2f} "
                  f"({args.clients} clients, {args.replicas} replica(s), {args.seconds:.0f} s each; indicative)")
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
