"""Jobs on one machine share its cores (issue 30: two pipeline runs side by side thrashed 2 cores)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import torch

from embedtune import cpu_share
from embedtune.console import track
from embedtune.cpu_share import CpuShare, sharing_cores

REGISTER_AND_WAIT = """
import sys, time
from embedtune.cpu_share import CpuShare
with CpuShare(sys.argv[1], cores=4):
    print("registered", flush=True)
    time.sleep(60)
"""


@pytest.fixture(autouse=True)
def _own_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_CPU_SHARE_DIR", str(tmp_path / "share"))
    monkeypatch.delenv("EMBEDTUNE_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("EMBEDTUNE_OMP_FROM_CPU_SHARE", raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_each_running_job_gets_its_share_of_the_cores(tmp_path):
    folder = tmp_path / "share"
    with CpuShare(folder, cores=4) as first:
        assert first.fair_threads() == 4
        with CpuShare(folder, cores=4):
            assert first.jobs() == 2
            assert first.fair_threads() == 2
        assert first.fair_threads() == 4  # the other job ended: all cores again
    assert not list(folder.glob("*.lock"))


def test_a_killed_job_is_not_counted_and_its_lock_file_is_cleared(tmp_path):
    folder = tmp_path / "share"
    other = subprocess.Popen([sys.executable, "-c", REGISTER_AND_WAIT, str(folder)], stdout=subprocess.PIPE,
                             text=True)
    try:
        assert other.stdout.readline().strip() == "registered"
        with CpuShare(folder, cores=4) as mine:
            assert mine.jobs() == 2
            other.send_signal(signal.SIGKILL)  # no cleanup code runs: only the kernel releases the lock
            other.wait(10)
            assert mine.jobs() == 1
            assert mine.fair_threads() == 4
            assert [p.name for p in folder.glob("*.lock")] == [mine._path.name]
    finally:
        other.kill()


def test_a_long_loop_gives_up_threads_within_seconds_when_another_job_starts(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_share, "RECHECK_SECONDS", 0.0)
    monkeypatch.setattr(cpu_share, "available_cores", lambda: 2)
    with sharing_cores() as share:
        assert torch.get_num_threads() == 2
        with CpuShare(share.directory, cores=2):  # a second job starts while the first loops
            for _ in track(range(3), "working"):
                pass
            assert torch.get_num_threads() == 1
        for _ in track(range(3), "working"):
            pass
        assert torch.get_num_threads() == 2


def test_a_thread_count_the_user_set_is_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBEDTUNE_THREADS", "3")
    folder = tmp_path / "share"
    with CpuShare(folder, cores=4) as first, CpuShare(folder, cores=4):
        assert first.fair_threads() == 3
        assert cpu_share.current_threads() == 3


def test_a_pipeline_run_is_registered_while_its_stages_run(tmp_path):
    from embedtune.config import load_recipe
    from embedtune.pipeline import run_pipeline

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"_id": f"d{i}", "text": f"passage number {i} " * 20}) + "\n"
                              for i in range(3)))
    seen = []

    def during_stage(_name: str) -> None:
        seen.append(len(list((tmp_path / "share").glob("*.lock"))))

    run_pipeline(load_recipe(None, [f"corpus.path={corpus}"]), tmp_path / "run", stages=["corpus"],
                 on_stage=during_stage)
    assert seen == [1]
    assert not list((tmp_path / "share").glob("*.lock"))  # and gone once it ended


def test_a_new_onnx_session_takes_this_jobs_share(tmp_path, monkeypatch):
    from embedtune.retrieval.onnx import session_options

    monkeypatch.setattr(cpu_share, "available_cores", lambda: 2)
    with sharing_cores(), CpuShare(tmp_path / "share", cores=2):
        assert session_options().intra_op_num_threads == 1


def test_a_thread_count_a_share_set_before_torch_loaded_is_not_taken_for_the_users(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not imported yet
    cpu_share._set_torch_threads(1)
    assert (cpu_share.os.environ["OMP_NUM_THREADS"], cpu_share.pinned_threads()) == ("1", None)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's own setting (in a child process, say)
    assert cpu_share.pinned_threads() == 3
