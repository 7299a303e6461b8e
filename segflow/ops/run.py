"""``segflow run``: pre-flight checks, then the Prefect flow against a server (the project's, or a temporary one).

Ctrl-C or SIGTERM stops the running stage (its last good outputs stay in place), records the run as
crashed and exits 130 / 143; a temporary server that dies mid-run ends the run with one line.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path


class Terminated(BaseException):
    """SIGTERM outside a flow run (inside one, Prefect raises its own TerminationSignal)."""


class ServerGone(BaseException):
    """The temporary Prefect server ended in the middle of the run."""


def on_sigterm(signum, _frame) -> None:
    raise Terminated(signum)


server_gone = threading.Event()


def _on_server_gone(signum, _frame) -> None:
    raise ServerGone(signum)


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
        yield api
        return
    home = prefect_home(root)
    print(f"segflow: starting a temporary Prefect server (database in {home})", file=sys.stderr, flush=True)
    # If the server dies mid-run, interrupt the run: there is nowhere left to record it.
    signal.signal(signal.SIGUSR1, _on_server_gone)
    main_thread = threading.main_thread().ident

    def gone(_code: int) -> None:
        server_gone.set()
        signal.pthread_kill(main_thread, signal.SIGUSR1)

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
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from segflow.errors import SegflowError
    from segflow.ops.home import find_api
    from segflow.ops.lock import check_free
    from segflow.ops.pipeline import pipeline
    from segflow.ops.server import PROCESS_TAG, crash_orphaned_runs
    from segflow.params import load_params
    from segflow.proc import process_identity

    load_params(root / "params.yaml")  # every stage's params, before anything starts or is deleted
    check_free(root)
    if not debug:
        quiet_console()
    temporary = find_api(root) is None
    with _prefect_api(root) as api:
        for name in crash_orphaned_runs(api):
            print(f"segflow: flow run {name} was left RUNNING by a killed segflow; marked CRASHED", file=sys.stderr)
        settings = {PREFECT_API_URL: api}
        if temporary:
            # A local temporary server has no flaky network to ride out; if it is gone, fail fast.
            settings[PREFECT_CLIENT_MAX_RETRIES] = 1
        with temporary_settings(settings), tags("segflow", PROCESS_TAG + process_identity()):
            state = pipeline(
                root=str(root), force=force, stages=stages, retries=retries, register=register, return_state=True
            )
    if state.is_failed():
        raise SegflowError(state.message)
    print(_report(state.result()))
    return 0
