"""Run a command on a leash: it stops when the process that started it is gone.

    python -m segflow.ops.leash PARENT [--grace SECONDS] [--tree] -- command [args...]

``PARENT`` is ``pid:start-time`` (:func:`segflow.proc.process_identity`).
The caller starts this wrapper in a new session; the wrapper runs the command
in that session and, once the parent has ended (even by SIGKILL, which the
parent cannot pass on), sends SIGTERM to the whole session's process group,
then SIGKILL to what is left after a grace period (``--grace``, default :data:`GRACE`); with
``--tree``, also to every process the command started in a session of its own. With ``SEGFLOW_FLOW_RUN``
and ``PREFECT_API_URL`` set, it also marks that Prefect flow run CRASHED, so
the dashboard never shows a dead run as RUNNING. Signals sent to the wrapper
are passed to the command; its exit status is the command's.

Kept tiny on purpose (no Prefect, no torch): it starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

from segflow.proc import is_alive

#: Seconds the command gets to stop (restore its outputs) after SIGTERM before SIGKILL.
GRACE = 20.0


def _processes() -> list[tuple[int, str, int, int]]:
    """(pid, state, parent pid, process group) of every process (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        found.append((int(entry), fields[0], int(fields[1]), int(fields[2])))
    return found


def group_members(pgid: int, exclude: int | None = None) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``."""
    return [pid for pid, state, _, group in _processes() if state != "Z" and group == pgid and pid != exclude]


def children(pid: int) -> list[int]:
    """The live children of ``pid``."""
    return [child for child, state, parent, _ in _processes() if parent == pid and state != "Z"]


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid``, whatever session or group it moved to, parents first."""
    children: dict[int, list[int]] = {}
    for child, state, parent, _ in _processes():
        if state != "Z":
            children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


def stop_processes(pids: list[int], grace: float = GRACE) -> None:
    """SIGTERM each of ``pids``; SIGKILL those still there after ``grace`` seconds."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + wait
        while (pids := [p for p in pids if _running(p)]) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not pids:
            return


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_group(pgid: int, grace: float = GRACE, exclude: int | None = None) -> None:
    """SIGTERM every process of ``pgid``; SIGKILL whatever is still there after ``grace`` seconds."""
    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        for pid in group_members(pgid, exclude):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        deadline = time.monotonic() + wait
        while group_members(pgid, exclude) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not group_members(pgid, exclude):
            return


def mark_crashed(message: str) -> None:
    """Mark ``SEGFLOW_FLOW_RUN`` CRASHED on the Prefect API and give back the GPU slot the dead parent held
    (``SEGFLOW_GPU_LEASE``), where those are known and the API answers."""
    run_id, api, lease = (os.environ.get(k) for k in ("SEGFLOW_FLOW_RUN", "PREFECT_API_URL", "SEGFLOW_GPU_LEASE"))
    if not api:
        return
    import httpx

    # If the server went with the parent, the next `segflow run` marks the run instead.
    with contextlib.suppress(httpx.HTTPError):
        if lease:
            httpx.post(f"{api}/v2/concurrency_limits/decrement-with-lease", json={"lease_id": lease}, timeout=5)
        if run_id:
            # Already ended (its worker's watch marked it, segflow/ops/orphan.py): keep what that said.
            found = httpx.get(f"{api}/flow_runs/{run_id}", timeout=5)
            if found.is_success and found.json().get("state_type") in ("CRASHED", "FAILED", "CANCELLED", "COMPLETED"):
                return
            state = {"type": "CRASHED", "name": "Crashed", "message": message}
            httpx.post(f"{api}/flow_runs/{run_id}/set_state", json={"state": state, "force": True}, timeout=5)


def main(argv: list[str]) -> int:
    grace, tree = GRACE, False
    while len(argv) > 2 and argv[1] in ("--grace", "--tree"):
        if argv[1] == "--tree":
            tree, argv = True, [argv[0], *argv[2:]]
        else:
            grace, argv = float(argv[2]), [argv[0], *argv[3:]]
    if len(argv) < 3 or argv[1] != "--":
        print(
            "usage: python -m segflow.ops.leash PARENT [--grace SECONDS] [--tree] -- command [args...]",
            file=sys.stderr,
        )
        return 2
    parent, command = argv[0], argv[2:]
    child = subprocess.Popen(command)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda s, _f: child.send_signal(s))

    while child.poll() is None:
        if not is_alive(parent):
            pid = parent.split(":")[0]
            # No output here: the parent held the other end of our stdout, and it is gone.
            # --tree: the command's children in sessions of their own (a worker's flow runs), found while the
            # command still lives to link them to it. Each first gets the grace period to end on its own once the
            # command is gone (a segflow flow run watches its worker: it marks itself CRASHED and its stage's
            # leash puts the outputs back); what is left then gets SIGTERM, then SIGKILL. Their own children
            # (stages) are left to their own leashes: a second SIGTERM could cut a stage's clean-up short.
            own = os.getpgid(0)
            started = [p for p in children(child.pid) if _group(p) not in (own, None)] if tree else []
            stop_group(own, grace=grace, exclude=os.getpid())
            if started:
                deadline = time.monotonic() + grace
                while (started := [p for p in started if _running(p)]) and time.monotonic() < deadline:
                    time.sleep(0.2)
                stop_processes(started, grace=grace)
            # A stage stopped in the middle of its clean-up (or by the SIGKILL after the grace period)
            # may leave its scratch folder; its process is gone now, so remove it here, not next run.
            from segflow.stage import prune_scratch

            with contextlib.suppress(OSError):
                prune_scratch()
            mark_crashed(f"segflow (process {pid}) was killed; its stage was stopped")
            break
        time.sleep(0.25)
    return child.wait()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
