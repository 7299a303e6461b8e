"""A local Prefect server as a context manager: for tests, benchmarks and one-off runs."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from flows.pipeline import stage_env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_server(home: Path, *, ui: bool = False, timeout: float = 180) -> Iterator[str]:
    """Start ``prefect server start`` on 127.0.0.1 with its own home (database); yield its API URL.

    Args:
        home: PREFECT_HOME of the server (its SQLite database and settings).
        ui: serve the dashboard too (slower to start).
        timeout: seconds to wait for ``/api/health``.

    Raises:
        RuntimeError: the server exited or did not answer in time (the message holds its log's tail).
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = home / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "prefect"),
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=stage_env(
                PREFECT_HOME=str(home),
                PREFECT_SERVER_ANALYTICS_ENABLED="false",
                PREFECT_UI_ENABLED=str(ui).lower(),
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        api = f"http://127.0.0.1:{port}/api"
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(api):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError(f"Prefect server did not start; its log ends:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            yield api
        finally:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()


def _healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
