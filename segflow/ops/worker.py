"""``segflow worker``: a process worker for the deployment's pool, run in the project folder.

The worker's own output passes through, with one change: a traceback becomes its last line (what
went wrong), unless ``--debug`` is given. When the Prefect server stops answering for a while, the
worker is stopped and ``segflow worker`` ends with one line saying so (Prefect's worker would
otherwise print tracebacks on every poll until someone stops it).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from segflow.ops.deploy import ensure_pool, heartbeat_env
from segflow.proc import process_identity

#: Seconds the server may fail its health check before the worker is stopped (SEGFLOW_SERVER_GRACE_S).
GRACE = 30.0
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b:?")


def worker_command(pool: str) -> list[str]:
    """Prefect's process worker, on a leash (segflow/ops/leash.py): if ``segflow worker`` is killed, even by
    SIGKILL, the leash stops Prefect's worker and the flow runs it started (its process group), whose
    stages then stop on their own leashes and mark their runs CRASHED. Nothing trains on for a dead worker."""
    prefect = [str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
    # A short grace: Prefect's worker takes its time over a SIGTERM, and its runs must not outlive us long.
    return [sys.executable, "-m", "segflow.ops.leash", process_identity(), "--grace", "5", "--tree", "--", *prefect]


class _Output:
    """Pass the worker's lines on; fold each traceback into one line naming its exception."""

    def __init__(self, debug: bool, out=sys.stderr):
        self.debug, self.out, self.inside = debug, out, False

    def line(self, text: str) -> None:
        if not self.debug and text.startswith("Traceback (most recent call last):"):
            self.inside = True
            return
        if self.inside:
            if _EXCEPTION.match(text):
                self.inside = False
                print(f"segflow worker: {text.strip()} (run with --debug for the traceback)", file=self.out, flush=True)
            return
        print(text, file=self.out, flush=True)


def _watch(api: str, grace: float, proc: subprocess.Popen, gone: list[str]) -> None:
    from segflow.ops.server import healthy

    failing_since = None
    while proc.poll() is None:
        time.sleep(1.0)
        if healthy(api):
            failing_since = None
            continue
        failing_since = failing_since or time.monotonic()
        if time.monotonic() - failing_since >= grace:
            gone.append(f"the Prefect server at {api} stopped answering ({grace:.0f} s)")
            proc.send_signal(signal.SIGINT)
            return


def worker(root: Path, api: str, debug: bool = False) -> int:
    """Run a process worker for the project's work pool, in the project folder, until interrupted.

    Returns:
        The worker's exit status; 1 when it was stopped because the server went away.
    """
    from segflow.ops.env import stage_env
    from segflow.params import load_params

    pool = load_params(root / "params.yaml").schedule.work_pool
    ensure_pool(pool)
    proc = subprocess.Popen(
        worker_command(pool),
        cwd=root,
        env=stage_env(PREFECT_API_URL=api, **heartbeat_env()),
        start_new_session=True,  # the leash's own group: what it stops when we are gone
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    gone: list[str] = []
    grace = float(os.environ.get("SEGFLOW_SERVER_GRACE_S") or GRACE)
    threading.Thread(target=_watch, args=(api, grace, proc, gone), daemon=True).start()
    output = _Output(debug)
    try:
        for raw in proc.stdout:
            output.line(raw.rstrip("\n"))
        code = proc.wait()
    except KeyboardInterrupt:
        # SIGINT lets the worker end its runs cleanly (SIGTERM can leave it waiting on a gone server).
        proc.send_signal(signal.SIGINT)
        for raw in proc.stdout:
            output.line(raw.rstrip("\n"))
        return proc.wait()
    if gone:
        print(
            f"segflow worker: error: {gone[0]}; worker stopped. Start the server again (`segflow server`, or "
            "check your team's), then `segflow worker`",
            file=sys.stderr,
            flush=True,
        )
        return 1
    return code
