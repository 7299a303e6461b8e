"""One DVC stage as one Prefect task: launched on a leash, its output logged at the right level.

The task runs ``dvc repro --single-item <stage>`` (so DVC decides, records
and caches exactly as ``dvc repro`` would), streams each line into the run's
log as INFO, WARNING or ERROR (DVC's git advice and library tips left out),
turns ``epoch N/M`` lines into a progress artifact, and ends in a state whose
message is the stage's own one-line error. Bad params or data fail at once;
only failures that can change (a killed process, a busy lock) are retried.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.states import Completed, Failed

from segflow.ops.leash import stop_group
from segflow.ops.slots import gpu_slot
from segflow.proc import process_identity
from segflow.stage import PARENT_ENV, restore

#: Stages that hold the GPU: at most one of them runs at a time across all runs (Prefect limit "gpu").
GPU_STAGES = {"train"}

# Lines that only repeat advice for people at a terminal.
_NOISE = (
    re.compile(r"^(To track the changes with git, run:|To enable auto staging, run:|Use `dvc push` to send)"),
    re.compile(r"^\s*(git add |dvc config core\.autostage)"),
    re.compile(r"^(💡 Tip:|GPU available:|TPU available:|HPU available:|Loading `train_dataloader` to estimate)"),
    re.compile(r"_pytree\.py:\d+: `isinstance\(treespec, LeafSpec\)` is deprecated"),
)
_ERROR = re.compile(r"^(segflow \w+: error:|ERROR:|Traceback|\w+Error: )")
_WARNING = re.compile(r"^(WARNING:|\[\w+\] WARNING |segflow \w+: stopped|.*\bWarning: )|restored the last good")
_EPOCH = re.compile(r"epoch (\d+)/(\d+): ")
#: The train stage's lines within an epoch, at most one per train.log_every_s (segflow/training/callbacks.py):
#: ``epoch 3/20, step 120/400: ...`` and ``epoch 3/20, validation 5/40: ...``.
_WITHIN = re.compile(r"epoch (\d+)/(\d+), (step|validation) (\d+)/(\d+): ")
#: The train stage stopped by its time budget: no epochs follow.
_DONE = re.compile(r"stopped by train\.max_minutes")
#: Least seconds between two artifact updates from within-epoch lines (epoch lines always update it).
PROGRESS_EVERY_S = 5.0
#: Exit statuses of a stage stopped by a signal (128 + SIGINT/SIGTERM, or killed: -9 / 137).
_STOPPED = {130, 143, 137, -9, -15}


def level_of(line: str) -> str | None:
    """The log level a stage's output line deserves, or None for lines to leave out."""
    if any(pattern.search(line) for pattern in _NOISE):
        return None
    if _ERROR.search(line):
        return "ERROR"
    if _WARNING.search(line):
        return "WARNING"
    return "INFO"


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; the message carries its own last error line."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


def failure_reason(stage: str, lines: list[str] | deque[str], code: int) -> str:
    """The most useful line of a failed stage's output: its own one-line error if it printed one.

    DVC's "is busy" error names the blocking processes on the lines after it: they join it on one line.
    """
    lines = list(lines)
    for prefix in ("segflow ", "ERROR"):
        found = [i for i, line in enumerate(lines) if line.startswith(prefix)]
        if found:
            line = lines[found[-1]]
            # The stage's own line already names the stage; keep what it says.
            line = re.sub(r"^segflow \w+: error: ", "", line)
            if "is busy, it is being blocked by:" in line:
                blockers = [b.strip() for b in lines[found[-1] + 1 :] if b.strip().startswith("(PID")]
                line = f"{line} {'; '.join(blockers)} (wait for it to finish, or stop it)"
            return f"stage '{stage}' failed: {line}"
    return f"stage '{stage}' failed with exit code {code}: {lines[-1] if lines else 'no output'}"


def retryable(code: int, lines: list[str] | deque[str]) -> bool:
    """Whether trying again could help: the stage was killed, or DVC found the project locked.

    A stage's own error (exit status 2: bad params or data) will fail the same way again.
    """
    text = "\n".join(lines)
    return code in _STOPPED or "Unable to acquire lock" in text or "is busy, it is being blocked" in text


def stop(proc: subprocess.Popen) -> None:
    """Stop a stage and everything it started, and wait until all of it is gone.

    The stage runs in its own session (DVC starts its command through a shell); SIGTERM lets it put back
    its last good outputs (segflow/stage.py) before it exits, SIGKILL follows for what is left after 30 s.
    """
    stop_group(proc.pid, grace=30)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


#: Stages running now in this process: (process, stage, project), for :func:`stop_running_stages`.
_RUNNING: list[tuple[subprocess.Popen, str, str]] = []


def stop_running_stages() -> list[str]:
    """Stop every stage this process runs now, as :func:`_launch` does on an exception; return their names.

    For a run that has to be abandoned from a signal handler (its Prefect server is gone).
    """
    stopped = []
    for proc, stage, root in list(_RUNNING):
        stop(proc)
        restore(stage, Path(root))
        stopped.append(stage)
    return stopped


def stage_command(stage: str, force: bool) -> list[str]:
    """``dvc repro --single-item <stage>``, on a leash: it stops if this process dies (segflow/ops/leash.py)."""
    dvc = [sys.executable, "-m", "dvc", "repro", "--single-item", stage, *(["--force"] if force else [])]
    return [sys.executable, "-m", "segflow.ops.leash", process_identity(), "--", *dvc]


def _env(**more: str) -> dict[str, str]:
    """The stage's environment: who owns it (the stage watches that process) and which flow run it serves."""
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL

    from segflow.ops.env import stage_env

    extra = {PARENT_ENV: process_identity(), **more}
    if flow_run.id and PREFECT_API_URL.value():
        extra |= {"SEGFLOW_FLOW_RUN": str(flow_run.id), "PREFECT_API_URL": PREFECT_API_URL.value()}
    return stage_env(**extra)


class _Progress:
    """A Prefect progress artifact that follows the ``epoch N/M`` lines of a stage: percent of the run.

    Lines within an epoch (``epoch 3/20, step 120/400: ...``) move it by the epoch's share of steps done,
    and a validation line to the end of its epoch's training. The artifact is written at most every
    :data:`PROGRESS_EVERY_S` seconds, whatever the lines (the first write and 100% always), so a server
    write is never a per-step or, with short epochs, a per-epoch cost. A stop by ``train.max_minutes``
    is 100%. The percent never goes back (the epoch line after such a stop names an early epoch).
    """

    def __init__(self, stage: str, clock=time.monotonic):
        self.stage, self.artifact = stage, None
        self.percent, self._clock, self._within_at = 0.0, clock, None

    def see(self, line: str) -> None:
        if found := _EPOCH.search(line):
            percent = 100.0 * int(found.group(1)) / max(int(found.group(2)), 1)
        elif found := _WITHIN.search(line):
            epoch, epochs, kind, done, total = found.groups()
            share = int(done) / max(int(total), 1) if kind == "step" else 1.0
            percent = 100.0 * (int(epoch) - 1 + min(share, 1.0)) / max(int(epochs), 1)
        elif _DONE.search(line):
            percent = 100.0
        else:
            return
        percent = min(percent, 100.0)
        if self.artifact is not None and percent <= self.percent:
            return  # no progress to show (a validation line after the epoch's, a line after 100%)
        now = self._clock()
        # Short epochs would write once an epoch (each write is a server event, kept for days): at most one
        # write per PROGRESS_EVERY_S, the first and the 100% always.
        if self._within_at is not None and now - self._within_at < PROGRESS_EVERY_S and percent < 100.0:
            self.percent = max(self.percent, percent)
            return
        self._within_at = now
        percent = self.percent = max(self.percent, percent)
        description = f"{self.stage}: {line.split('] INFO ', 1)[-1]}"
        if self.artifact is None:
            self.artifact = create_progress_artifact(
                percent, key=f"segflow-{self.stage}-progress", description=description
            )
        else:
            update_progress_artifact(self.artifact, percent, description=description)


def _launch(stage: str, root: str, force: bool, logger, lease: str | None = None) -> tuple[int, deque[str], bool]:
    """Run the stage; return (exit status, last lines, whether DVC ran its command)."""
    ran = False
    tail: deque[str] = deque(maxlen=40)
    progress = _Progress(stage)
    with subprocess.Popen(
        stage_command(stage, force),
        cwd=root,
        env=_env(**({"SEGFLOW_GPU_LEASE": lease} if lease else {})),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group: a terminal's Ctrl-C reaches segflow, which stops it
    ) as proc:
        _RUNNING.append(entry := (proc, stage, root))
        try:
            for raw in proc.stdout:
                line = raw.rstrip()
                if line.strip():
                    tail.append(line)
                    ran = ran or line.startswith("Running stage")
                    _log(logger, line)
                    progress.see(line)
            return proc.wait(), tail, ran
        except BaseException:
            stop(proc)
            # Everything that wrote to the pipe is gone now: log what it said on its way out.
            for line in proc.stdout.read().splitlines():
                if line.strip():
                    _log(logger, line.rstrip())
            # The stage restores its own outputs when stopped; this covers a stop before it started.
            restore(stage, Path(root))
            raise
        finally:
            _RUNNING.remove(entry)


def _slot(stage: str, root: str, logger) -> contextlib.AbstractContextManager[str | None]:
    """The ``gpu`` slot for a GPU stage (segflow/ops/slots.py), nothing for the others."""
    if stage not in GPU_STAGES:
        return contextlib.nullcontext()
    from prefect.runtime import flow_run
    from prefect.settings import PREFECT_API_URL

    return gpu_slot(Path(root), PREFECT_API_URL.value(), flow_run.name, lambda line: logger.warning("%s", line))


def _log(logger, line: str) -> None:
    level = level_of(line)
    if level is not None:
        logger.log(getattr(logging, level), "%s", line)


def _no_retry_for_stage_errors(task, task_run, state) -> bool:
    return state.name == "Interrupted"


@task(name="dvc-stage", task_run_name="{stage}", retry_condition_fn=_no_retry_for_stage_errors)
def run_stage(stage: str, root: str, force: bool = False, planned: bool = True):
    """Run one DVC stage (``dvc repro --single-item``), streaming its output into the run's log.

    Args:
        planned: False when segflow already knows DVC would skip the stage (nothing it depends on
            changed): the task records the skip without starting DVC.

    Returns:
        A Completed state with ``{"stage", "status": "ran" | "skipped", "seconds"}``, or a Failed one whose
        message is the stage's one-line error (named ``Interrupted`` when a retry could help).
    """
    logger = get_run_logger()
    if not planned:
        logger.info("stage %s skipped: nothing it depends on changed", stage)
        return Completed(data={"stage": stage, "status": "skipped", "seconds": 0.0})
    started = time.perf_counter()
    with _slot(stage, root, logger) as lease:
        code, tail, ran = _launch(stage, root, force, logger, lease)
    seconds = round(time.perf_counter() - started, 1)
    if code != 0:
        restore(stage, Path(root))
        reason = failure_reason(stage, tail, code)
        logger.error("%s", reason)
        return Failed(message=reason, name="Interrupted" if retryable(code, tail) else "Failed")
    result = {"stage": stage, "status": "ran" if ran else "skipped", "seconds": seconds}
    logger.info("stage %s %s in %.1fs", stage, result["status"], seconds)
    return Completed(data=result)
