"""A local Prefect server on 127.0.0.1, kept on a leash, and the runs a killed segflow left behind.

The server runs as ``python -m segflow.ops.leash <us> -- prefect server start ...``
in its own session: a Ctrl-C in the terminal reaches segflow, not the server
(segflow still needs it to record how the run ended), and if segflow is
killed outright the leash stops the server within a second instead of
leaving it running.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from segflow.ops.database import DATABASE_VARIABLES, database_url, server_database
from segflow.ops.env import stage_env
from segflow.ops.leash import stop_group
from segflow.proc import is_alive, process_identity

#: Tag prefix naming the segflow process behind a flow run (see :func:`crash_orphaned_runs`).
PROCESS_TAG = "segflow-process:"
HOST_TAG = "segflow-host:"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def server_env(
    home: Path, port: int, ui: bool = True, host: str = "127.0.0.1", database: str | None = None
) -> dict[str, str]:
    """What ``prefect server start`` needs here: its own home (database), no telemetry, the UI told
    which port the API is on (Prefect's UI otherwise calls port 4200 whatever ``--port`` says), and
    concurrency leases kept on disk in that home (Prefect's default keeps them in the server's memory:
    a server killed with a training run would forget the run's ``gpu`` lease but not the slot it
    took, and the slot would stay taken for good; on disk, the repossessor frees it once it expires).

    The database is ``database``, else the one Prefect's ``PREFECT_API_DATABASE_CONNECTION_URL`` names
    (:func:`segflow.ops.database.server_database`, in the driver form Prefect needs), else SQLite in
    ``home``. It travels in the environment, never on a command line other users' ``ps`` shows."""
    database = database_url(database) if database else server_database()
    return stage_env(
        **(dict.fromkeys(DATABASE_VARIABLES, database) if database else {}),
        PREFECT_HOME=str(home),
        PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE="prefect.server.concurrency.lease_storage.filesystem",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED=str(ui).lower(),
        PREFECT_SERVER_API_HOST=host,
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_API_URL=f"http://{host}:{port}/api",
    )


def server_command(port: int, host: str = "127.0.0.1") -> list[str]:
    return [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", host, "--port", str(port)]


@contextlib.contextmanager
def local_server(
    home: Path,
    *,
    ui: bool = False,
    timeout: float = 180,
    port: int | None = None,
    on_exit: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """Start a Prefect server on 127.0.0.1 with its own home (database); yield its API URL; stop it.

    Args:
        home: PREFECT_HOME of the server (its SQLite database and settings).
        ui: serve the dashboard too (slower to start).
        timeout: seconds to wait for ``/api/health``.
        port: the port (default: a free one).
        on_exit: called (from another thread, with the exit status) if the server ends while in use.

    Raises:
        RuntimeError: the server exited or did not answer in time (the message holds its log's tail).
    """
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    log_path = home / "server.log"
    api = f"http://127.0.0.1:{port}/api"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "segflow.ops.leash", process_identity(), "--", *server_command(port)],
            env=server_env(home, port, ui),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + timeout
            while not healthy(api):
                if server.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError(f"Prefect server did not start; its log ends:\n{log_path.read_text()[-3000:]}")
                time.sleep(0.5)
            stopping = threading.Event()
            if on_exit is not None:
                threading.Thread(target=_watch, args=(server, stopping, on_exit), daemon=True).start()
            yield api
        finally:
            stopping.set()
            # uvicorn waits for open client connections before it stops; 5 s is plenty for a local server.
            stop_group(server.pid, grace=5)
            server.wait()


def _watch(server: subprocess.Popen, stopping: threading.Event, on_exit: Callable[[int], None]) -> None:
    while not stopping.wait(0.5):
        code = server.poll()
        if code is not None:
            if not stopping.is_set():
                on_exit(code)
            return


def healthy(api: str) -> bool:
    try:
        return httpx.get(f"{api}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def run_tags() -> list[str]:
    """Tags naming the segflow process (and machine) behind a flow run, for :func:`crash_orphaned_runs`."""
    return [PROCESS_TAG + process_identity(), HOST_TAG + socket.gethostname()]


def crash_orphaned_runs(api: str) -> list[str]:
    """Mark CRASHED the RUNNING/PENDING segflow flow runs of this machine whose segflow process is gone
    (killed), and their task runs still RUNNING or PENDING (the stage the run was in).

    Runs tagged with another machine are left alone: a process there cannot be checked from here.

    Returns:
        The names of the runs marked.
    """
    running = httpx.post(
        f"{api}/flow_runs/filter",
        json={"flow_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING"]}}, "tags": {"all_": ["segflow"]}}},
        timeout=10,
    )
    running.raise_for_status()
    marked = []
    for run in running.json():
        owner = next((t.removeprefix(PROCESS_TAG) for t in run["tags"] if t.startswith(PROCESS_TAG)), None)
        host = next((t.removeprefix(HOST_TAG) for t in run["tags"] if t.startswith(HOST_TAG)), socket.gethostname())
        if owner is None or host != socket.gethostname() or is_alive(owner):
            continue
        message = f"segflow (process {owner.split(':')[0]}) ended without reporting: killed"
        state = {"type": "CRASHED", "name": "Crashed", "message": message}
        httpx.post(f"{api}/flow_runs/{run['id']}/set_state", json={"state": state, "force": True}, timeout=10)
        tasks = httpx.post(
            f"{api}/task_runs/filter",
            json={
                "flow_runs": {"id": {"any_": [run["id"]]}},
                "task_runs": {"state": {"type": {"any_": ["RUNNING", "PENDING"]}}},
            },
            timeout=10,
        )
        for task_run in tasks.json() if tasks.status_code == 200 else []:
            httpx.post(f"{api}/task_runs/{task_run['id']}/set_state", json={"state": state, "force": True}, timeout=10)
        marked.append(run["name"])
    return marked
