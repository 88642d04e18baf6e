"""Run the app under uvicorn: in the foreground (CLI) or in a background thread (tests, benchmarks)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
import uvicorn

from embedtune.config import ServeConfig
from embedtune.serve.app import create_app
from embedtune.serve.loading import ModelEntry


def run_server(entries: Sequence[ModelEntry], config: ServeConfig, api_key: str | None = None,
               log_level: str = "info", docs: bool = True) -> None:
    """Serve in the foreground until interrupted. A model that fails to load stops the server and raises
    :class:`ModelLoadError` (the command exits non-zero) rather than leave a server that only answers 503."""
    app = create_app(entries, config, api_key, docs=docs)
    server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                                           access_log=False, timeout_graceful_shutdown=10))
    state = app.state.serve
    state.on_load_failure = lambda: setattr(server, "should_exit", True)
    server.run()
    if (failure := state.load_failure()) is not None:
        raise failure


@dataclass
class ServerThread:
    server: uvicorn.Server
    thread: threading.Thread
    url: str

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until /v1/health/ready says 200 (models loaded)."""
        wait_ready(self.url, timeout, alive=self.thread.is_alive, interval=0.05)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_ready(url: str, timeout: float = 120.0, alive: Callable[[], bool] | None = None,
               interval: float = 0.25) -> None:
    """Poll ``url``/v1/health/ready until it answers 200; fail early once ``alive()`` turns false."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise RuntimeError(f"the server behind {url} stopped before it was ready")
        try:
            if httpx.get(f"{url}/v1/health/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(interval)
    raise TimeoutError(f"{url} not ready after {timeout}s")


def start_in_thread(app, host: str = "127.0.0.1") -> ServerThread:
    """Start a real uvicorn server on a free port (the socket is bound first, so there is no race)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    if not server.started:
        raise RuntimeError("uvicorn did not start")
    return ServerThread(server, thread, f"http://{host}:{port}")
