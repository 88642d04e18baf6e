"""Processes on this machine: its host name (recorded on the jobs and deployments it runs) and whether a pid
still lives. Shared by the scheduler (workers) and the deployment manager (model servers)."""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

HOST = socket.gethostname()


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped by a parent that is gone) is dead for our purposes.
    with contextlib.suppress(OSError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    return True
