"""``segflow run``: pre-flight checks, then the Prefect flow against a server (the project's, or a temporary one).

Ctrl-C or SIGTERM stops the running stage (its last good outputs stay in place), records the run as
crashed and exits 130 / 143. A server that goes away mid-run (the temporary one exits, the project's
``segflow server`` or PREFECT_API_URL's stops answering) stops the running stage the same way and ends
the run with one line, exit status 1.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path


class Terminated(BaseException):
    """SIGTERM outside a flow run (inside one, Prefect raises its own TerminationSignal)."""


def on_sigterm(signum, _frame) -> None:
    raise Terminated(signum)


server_gone = threading.Event()
#: Why the run had to be abandoned (set with :data:`server_gone`): one line for the user.
gone_reason: list[str] = []
#: Seconds a Prefect server may fail its health check before the run gives up on it: the project's own
#: ``segflow server`` (same machine), and a server named by PREFECT_API_URL (a team's: ride out a blip).
#: ``SEGFLOW_SERVER_GRACE_S`` overrides both.
GRACE_LOCAL, GRACE_REMOTE = 10.0, 60.0


def _abandon(_signum=None, _frame=None) -> None:
    """The Prefect server is gone: stop the running stage (its last good outputs come back), say so, exit 1.

    Runs as the SIGUSR1 handler in the main thread. Nothing can be recorded any more, and Prefect's
    client would retry for minutes before failing with a traceback; the run is marked CRASHED by the next
    ``segflow run`` against the server, and its gpu slot reclaimed (segflow/ops/slots.py).
    """
    from segflow.ops.runner import stop_running_stages

    stopped = stop_running_stages()
    done = (
        f"stopped stage {', '.join(stopped)} (its last good outputs are in place; training resumes from its "
        "checkpoint next time)"
        if stopped
        else "no stage was running"
    )
    reason = gone_reason[-1] if gone_reason else "the Prefect server stopped during the run"
    print(f"segflow: error: {reason}; {done}", file=sys.stderr, flush=True)
    os._exit(1)  # no exit-time log upload: there is no server to take it


def _give_up(reason: str) -> None:
    gone_reason.append(reason)
    server_gone.set()
    signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR1)


@contextlib.contextmanager
def _watched(api: str, grace: float, advice: str, every: float = 1.0) -> Iterator[None]:
    """Check ``api``'s health every ``every`` seconds while the run uses it; give up on it (see
    :func:`_abandon`) once it has failed for ``grace`` seconds in a row."""
    from segflow.ops.server import healthy

    stopping = threading.Event()

    def watch() -> None:
        failing_since = None
        while not stopping.wait(every):
            if healthy(api):
                failing_since = None
                continue
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since >= grace and not stopping.is_set():
                _give_up(f"the Prefect server at {api} stopped answering ({grace:.0f} s) during the run; {advice}")
                return

    signal.signal(signal.SIGUSR1, _abandon)
    thread = threading.Thread(target=watch, name="segflow-server-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stopping.set()


class _WithoutTraceback(logging.Formatter):
    """A console formatter that leaves tracebacks out (``--debug`` keeps them): one line per problem."""

    def __init__(self, inner: logging.Formatter):
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def quiet_console() -> None:
    """Prefect's console log: no tracebacks (Prefect also logs "NoneType: None" for failed states)."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import PrefectConsoleHandler

    ensure_logging_setup()
    loggers = [
        logging.getLogger(),
        *(v for v in logging.Logger.manager.loggerDict.values() if isinstance(v, logging.Logger)),
    ]
    for handler in {h for logger in loggers for h in logger.handlers}:
        if isinstance(handler, PrefectConsoleHandler) and not isinstance(handler.formatter, _WithoutTraceback):
            handler.setFormatter(_WithoutTraceback(handler.formatter or logging.Formatter()))


def prefect_defaults() -> None:
    """Quiet, local-only Prefect defaults, unless the user set them."""
    # Offline machines log telemetry errors from the server otherwise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _report(summary: dict) -> str:
    from segflow.ops.summary import headline

    ran = any(s["status"] == "ran" for s in summary["stages"])
    lines = ["", "segflow: pipeline finished" + ("" if ran else ": nothing changed, every stage is up to date")]
    lines += [f"  {s['stage']:<10} {s['status']:<8} {s['seconds']:>7.1f}s" for s in summary["stages"]]
    outputs = summary["outputs"]
    lines += [
        f"  data:        {outputs['data_report']}",
        f"  metrics:     {outputs['metrics']}  (dvc metrics show)",
        f"  plots:       {outputs['predictions']}, training curves in "
        f"{Path(outputs['training_metrics']).parent}/plots  (dvc plots show)",
        f"  model:       {outputs['model']}/",
    ]
    if summary["metrics"]:
        lines.append(f"  {headline(summary['metrics'])}")
        lines.append(f"  {summary['change']}")
    if summary.get("registration"):
        from segflow.registry.register import summary_line

        lines.append(f"  registry: {summary_line(summary['registration'])}")
    return "\n".join(lines)


@contextlib.contextmanager
def _prefect_api(root: Path) -> Iterator[str]:
    """The Prefect API to record the run on: ``PREFECT_API_URL`` or the project's ``segflow server`` when
    there is one, else a temporary local server (same database, ``.segflow/prefect``) stopped afterwards."""
    from segflow.ops.home import find_api, prefect_home
    from segflow.ops.server import local_server

    api = find_api(root)
    if api:
        remote = bool(os.environ.get("PREFECT_API_URL"))
        grace = float(os.environ.get("SEGFLOW_SERVER_GRACE_S") or (GRACE_REMOTE if remote else GRACE_LOCAL))
        advice = (
            "check the server, then rerun `segflow run`"
            if remote
            else "start it again (`segflow server`) and rerun `segflow run`"
        )
        with _watched(api, grace, advice):
            yield api
        return
    home = prefect_home(root)
    print(f"segflow: starting a temporary Prefect server (database in {home})", file=sys.stderr, flush=True)
    # If the server dies mid-run, abandon the run: there is nowhere left to record it.
    signal.signal(signal.SIGUSR1, _abandon)

    def gone(_code: int) -> None:
        _give_up(f"the temporary Prefect server stopped during the run (its log: {home / 'server.log'})")

    with local_server(home, on_exit=gone) as api:
        try:
            yield api
        finally:
            # Send the run's last log lines before the server goes.
            from prefect.logging.handlers import APILogWorker

            if not server_gone.is_set():
                APILogWorker.drain_all(timeout=5)


def run(
    root: Path, force: bool, stages: list[str] | None, retries: int, debug: bool = False, register: bool = False
) -> int:
    """``segflow run``: pre-flight checks, then the flow against a Prefect server."""
    from prefect import tags
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, PREFECT_UI_URL, temporary_settings

    from segflow.errors import SegflowError
    from segflow.ops.home import find_api, prefect_home
    from segflow.ops.lock import check_free
    from segflow.ops.pipeline import pipeline
    from segflow.ops.server import crash_orphaned_runs, run_tags
    from segflow.ops.slots import reclaim_dead
    from segflow.params import load_params

    load_params(root / "params.yaml")  # every stage's params, before anything starts or is deleted
    check_free(root)
    if not debug:
        quiet_console()
    temporary = find_api(root) is None
    with _prefect_api(root) as api:
        for name in crash_orphaned_runs(api):
            print(f"segflow: flow run {name} was left RUNNING by a killed segflow; marked CRASHED", file=sys.stderr)
        for line in reclaim_dead(root, api):
            print(f"segflow: {line}", file=sys.stderr)
        settings = {PREFECT_API_URL: api}
        if temporary:
            # A local temporary server has no flaky network to ride out; if it is gone, fail fast.
            settings[PREFECT_CLIENT_MAX_RETRIES] = 1
            # No "View at http://127.0.0.1:PORT/..." lines: that server has no dashboard and is gone after the run.
            settings[PREFECT_UI_URL] = ""
        with temporary_settings(settings), tags("segflow", *run_tags()):
            state = pipeline(
                root=str(root), force=force, stages=stages, retries=retries, register=register, return_state=True
            )
    if state.is_failed() or state.is_cancelled():  # Cancelled: the project was busy (another run holds it)
        raise SegflowError(state.message)
    print(_report(state.result()))
    if temporary:
        print(
            f"  history:     this run and the ones before it are kept in {prefect_home(root)}; to browse them, "
            "run `segflow server` and open http://127.0.0.1:4200"
        )
    return 0
