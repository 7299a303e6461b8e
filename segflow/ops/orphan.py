"""A deployment's flow run ends when the worker that started it is gone.

Prefect's process worker starts each flow run as a child process in a session of its own, so a worker
killed outright (SIGKILL, the OOM killer) leaves its flow runs behind: training on, on a GPU nobody
schedules any more, reported RUNNING by nobody's worker. :func:`watch_worker` runs in the flow-run
process and checks every second that the process which started it is still the same process; once it
is not, it marks the flow run CRASHED (one line naming the worker) and kills its own process. The
stage underneath is on a leash to this process (segflow/ops/leash.py): it is stopped, puts back its
last good outputs, and gives back its GPU slot, as after any killed run. The checkpoint stays, so the
next run resumes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time

from segflow.proc import is_alive, process_identity

log = logging.getLogger(__name__)


def watch_worker(run_id: str, api: str | None, interval: float = 1.0) -> threading.Thread:
    """Watch the parent process (the worker) from a daemon thread; see the module's docstring.

    Args:
        run_id: the flow run this process executes.
        api: the Prefect API to mark it CRASHED on (``None``: only stop).
    """
    parent = process_identity(os.getppid())
    thread = threading.Thread(
        target=_watch, args=(parent, run_id, api, interval), name="segflow-worker-watch", daemon=True
    )
    thread.start()
    return thread


def _watch(parent: str, run_id: str, api: str | None, interval: float) -> None:
    while is_alive(parent):
        time.sleep(interval)
    message = (
        f"its worker (process {parent.split(':')[0]}) is gone; the run was stopped (its stage's outputs put "
        "back, its checkpoint kept: the next run resumes)"
    )
    if api:
        import httpx

        with contextlib.suppress(httpx.HTTPError):
            state = {"type": "CRASHED", "name": "Crashed", "message": message}
            httpx.post(f"{api}/flow_runs/{run_id}/set_state", json={"state": state, "force": True}, timeout=5)
    log.error("segflow: %s", message)
    os.kill(os.getpid(), signal.SIGKILL)  # the stage's leash does the rest
