"""The platform service as users run it: a real `embedtune platform` process on 127.0.0.1 with a SQLite file,
jobs in worker processes. Covers a completed job, cancel, a worker killed with SIGKILL, and restarts of the
service with a job running (failed by default, re-queued by config, adopted when its worker survived)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from embedtune.platform.client import PlatformAPIError, PlatformClient

SRC = Path(__file__).resolve().parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def wait_for(predicate, timeout: float = 60, poll: float = 0.2, what: str = "condition"):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"{what} not reached within {timeout} s")


class Service:
    """`python -m embedtune platform` in a subprocess; stop() ends it and every process it started."""

    def __init__(self, data_dir: Path, *args: str):
        self.data_dir, self.args = data_dir, args
        # Path registration is off by default; here it is allowed under pytest's base temp folder, where the
        # tests' model folders (tiny_bert_dir) live.
        self.path_root = data_dir.parents[1]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Service:
        env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
        cmd = [sys.executable, "-m", "embedtune", "platform", "--data-dir", str(self.data_dir), "--port",
               str(self.port), "--heartbeat", "0.5", "--stale-after", "5", "--allow-path-registration",
               "--path-root", str(self.path_root), *self.args]
        log = (self.data_dir.parent / f"service-{self.port}.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"service exited with {self.proc.returncode}; see {log.name}")
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{self.url}/v1/health/ready", timeout=1).status_code == 200
            return False

        wait_for(ready, timeout, what="service ready")
        return self

    @property
    def admin_key(self) -> str:
        """Written by the service on its first start (0600), as an operator would read it."""
        return (self.data_dir / "admin.key").read_text().strip()

    def client(self, workspace: str = "default", api_key: str | None = None) -> PlatformClient:
        return PlatformClient(self.url, workspace=workspace, timeout=60, api_key=api_key or self.admin_key)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop_service_only(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def stop(self) -> None:
        """End the service, then any worker or serving process it recorded (by pid)."""
        self.stop_service_only()
        for pid in recorded_pids(self.data_dir):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


def recorded_pids(data_dir: Path) -> list[int]:
    import sqlite3

    path = data_dir / "platform.db"
    if not path.is_file():
        return []
    with contextlib.closing(sqlite3.connect(path)) as con:
        rows = con.execute("SELECT worker_pid FROM jobs WHERE worker_pid IS NOT NULL "
                           "UNION SELECT pid FROM deployments WHERE pid IS NOT NULL").fetchall()
    return [r[0] for r in rows if pid_alive(r[0])]


def write_corpus(folder: Path, n_docs: int = 12) -> Path:
    from conftest import make_documents

    folder.mkdir(parents=True, exist_ok=True)
    for doc in make_documents(n_per_topic=max(1, n_docs // 6)):
        (folder / f"{doc['_id']}.txt").write_text(f"{doc['title']}\n\n{doc['text']}\n")
    return folder


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    svc = Service(tmp_path_factory.mktemp("platform") / "data").start()
    yield svc
    svc.stop()


@pytest.fixture(scope="module")
def workspace(service, tiny_bert_dir, tmp_path_factory):
    """A workspace with the tiny BERT registered as a base model and a small corpus uploaded."""
    pc = service.client("jobs")
    pc.ensure_workspace()
    pc.register_model("tiny", tiny_bert_dir)
    pc.upload_dataset("docs", write_corpus(tmp_path_factory.mktemp("docs") / "docs"))
    return pc


def corpus_job(pc: PlatformClient, **extra) -> dict:  # noqa: ANN003
    return pc.create_customization_job(model="tiny", dataset="docs", stages=["corpus"], **extra)


def wait_running_with_pid(pc: PlatformClient, job_id: str) -> dict:
    return wait_for(lambda: (j := pc.get_job(job_id))["status"] == "running" and j["worker"]["pid"] and j,
                    timeout=60, poll=0.05, what="job running")


def test_corpus_job_completes_with_stage_progress_and_logs(workspace):
    job = corpus_job(workspace, name="chunk-only")
    queued = corpus_job(workspace)  # max_workers=1: waits behind the first, and is cancelled while pending
    assert job["status"] == "pending" and job["stages"] == ["corpus"]
    assert workspace.cancel_job(queued["id"])["status"] == "cancelled"
    done = workspace.wait_job(job["id"], timeout=120, poll=0.3)
    assert done["status"] == "completed", done["error"]
    assert done["status_details"]["stages_completed"] == ["corpus"]
    assert done["result"]["stages"]["corpus"]["counts"]["chunks"] > 0
    assert done["output_model"] is None  # no finetune stage ran: no model
    chunks = Path(done["result"]["run_dir"]) / "corpus" / "chunks.jsonl"
    assert sum(1 for _ in chunks.open()) == done["result"]["stages"]["corpus"]["counts"]["chunks"]
    assert "=== stage corpus" in workspace.job_logs(job["id"])
    assert workspace.job_status(job["id"])["status"] == "completed"
    assert [j["id"] for j in workspace.list_jobs(status="completed")].count(job["id"]) == 1
    never_ran = workspace.get_job(queued["id"])
    assert never_ran["status"] == "cancelled" and never_ran["worker"]["pid"] is None


def test_job_request_errors_are_openai_shaped(workspace):
    with pytest.raises(PlatformAPIError) as err:
        workspace.create_customization_job(model="tiny", dataset="nope")
    assert err.value.status == 404 and err.value.error["param"] == "dataset"
    with pytest.raises(PlatformAPIError) as err:
        workspace.create_customization_job(model="tiny", dataset="docs", stages=["corpus", "prep"])
    assert err.value.status == 422 and "consecutive" in err.value.error["message"]
    with pytest.raises(PlatformAPIError) as err:
        workspace.create_customization_job(model="tiny", dataset="docs", stages=["corpus"],
                                           recipe={"corpus": {"chunk_tokes": 10}})
    assert err.value.status == 422 and "chunk_tokens" in err.value.error["message"]  # names the near key
    with pytest.raises(PlatformAPIError) as err:
        workspace.create_customization_job(model="tiny", dataset="docs", hyperparameters={"epochs": -1})
    assert err.value.status == 422 and err.value.error["param"] == "hyperparameters.epochs"


def test_cancel_running_job_stops_its_worker(workspace):
    # NeMo Platform v2's path for the same request
    job = workspace.request("POST", "/apis/customization/v2/workspaces/jobs/automodel/jobs",
                            json={"model": "tiny", "dataset": {"training": "docs"}, "stages": ["corpus"]})
    pid = wait_running_with_pid(workspace, job["id"])["worker"]["pid"]
    cancelled = workspace.cancel_job(job["id"])
    assert cancelled["status"] in ("cancelling", "cancelled")
    final = workspace.wait_job(job["id"], timeout=30, poll=0.1)
    assert final["status"] == "cancelled"
    wait_for(lambda: not pid_alive(pid), timeout=10, what="worker gone")
    with pytest.raises(PlatformAPIError) as err:
        workspace.cancel_job(job["id"])
    assert err.value.status == 409


def test_worker_killed_mid_job_fails_job_with_reason(workspace):
    # the older Customizer's path and body shape: the workspace is the dataset's namespace
    job = workspace.request("POST", "/v1/customization/jobs",
                            json={"config": "tiny", "dataset": {"namespace": "jobs", "name": "docs"},
                                  "hyperparameters": {"epochs": 1}, "stages": ["corpus"]})
    assert job["workspace"] == "jobs" and job["model"] == "tiny"
    pid = wait_running_with_pid(workspace, job["id"])["worker"]["pid"]
    os.kill(pid, signal.SIGKILL)
    final = workspace.wait_job(job["id"], timeout=30, poll=0.1)
    assert final["status"] == "failed"
    assert f"worker process {pid} was killed by signal SIGKILL" in final["error"]


def crash(svc: Service, kill_worker_pids: list[int]) -> None:
    """A machine crash as far as the platform can tell: the service and some workers die with SIGKILL."""
    svc.kill()
    for pid in kill_worker_pids:
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda p=pid: not pid_alive(p), timeout=10, what="worker gone")


@pytest.fixture(scope="module")
def restarted(tmp_path_factory, tiny_bert_dir):
    """Service A runs two jobs and crashes; only the first job's worker dies with it. Service B starts on the
    same database and files."""
    root = tmp_path_factory.mktemp("restart")
    first = Service(root / "data", "--max-workers", "2").start()
    try:
        pc = first.client()
        pc.register_model("tiny", tiny_bert_dir)
        pc.upload_dataset("docs", write_corpus(root / "docs"))
        dead = pc.create_customization_job(model="tiny", dataset="docs", stages=["corpus"])
        alive = pc.create_customization_job(model="tiny", dataset="docs", stages=["corpus"])
        dead_pid = wait_running_with_pid(pc, dead["id"])["worker"]["pid"]
        alive_pid = wait_running_with_pid(pc, alive["id"])["worker"]["pid"]
        crash(first, [dead_pid])
    finally:
        first.stop_service_only()
    second = Service(root / "data").start()
    yield {"service": second, "dead": (dead["id"], dead_pid), "alive": (alive["id"], alive_pid), "root": root}
    second.stop()


def test_restart_marks_job_of_dead_worker_failed(restarted):
    job_id, pid = restarted["dead"]
    job = restarted["service"].client().get_job(job_id)  # recovered before the first request was served
    assert job["status"] == "failed"
    assert f"worker pid {pid}" in job["error"] and "found when the service started" in job["error"]


def test_restart_adopts_job_whose_worker_survived(restarted):
    job_id, pid = restarted["alive"]
    job = restarted["service"].client().wait_job(job_id, timeout=120, poll=0.3)
    assert job["status"] == "completed", job["error"]
    assert job["worker"]["pid"] == pid and job["worker"]["attempts"] == 1


def test_restart_requeues_job_of_dead_worker_when_configured(restarted):
    second = restarted["service"]
    pc = second.client()
    pc.wait_job(restarted["alive"][0], timeout=120, poll=0.3)  # one job at a time from here
    job = pc.create_customization_job(model="tiny", dataset="docs", stages=["corpus"])
    pid = wait_running_with_pid(pc, job["id"])["worker"]["pid"]
    crash(second, [pid])
    third = Service(restarted["root"] / "data", "--on-orphan", "requeue").start()
    try:
        done = third.client().wait_job(job["id"], timeout=120, poll=0.3)
        assert done["status"] == "completed", done["error"]
        assert done["worker"]["attempts"] == 2 and done["worker"]["pid"] != pid
        assert f"worker pid {pid}" in done["status_details"]["requeued_because"]
    finally:
        third.stop()


def test_openapi_has_tags_and_response_models(service):
    spec = httpx.get(f"{service.url}/openapi.json").json()
    post = spec["paths"]["/v2/workspaces/{workspace}/customization/jobs"]["post"]
    assert post["tags"] == ["customization"]
    assert post["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobOut")
    assert "ErrorBody" in json.dumps(post["responses"]["422"])
    tags = {t for item in spec["paths"].values() for op in item.values() for t in op.get("tags", [])}
    assert {"datasets", "models", "customization", "evaluation", "deployments", "inference"} <= tags
