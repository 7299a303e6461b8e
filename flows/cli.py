"""The ``segflow`` command.

``segflow run`` runs the whole pipeline through the Prefect flow;
``segflow stages`` lists the stages in the order they run. Hyperparameters are
not command-line flags on purpose: they live in params.yaml, where DVC sees
them (``dvc exp run -S train.lr=0.001``).

Every expected failure prints one line (``segflow: error: ...``); ``--debug``
adds the traceback. Ctrl-C or SIGTERM stops the running stage (its last good
outputs stay in place), records the run as crashed and exits 130 / 143.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path


class Terminated(BaseException):
    """SIGTERM outside a flow run (inside one, Prefect raises its own TerminationSignal)."""


class ServerGone(BaseException):
    """The temporary Prefect server ended in the middle of the run."""


def _on_sigterm(signum, _frame) -> None:
    raise Terminated(signum)


_server_gone = threading.Event()


def _on_server_gone(signum, _frame) -> None:
    raise ServerGone(signum)


def _prefect_defaults() -> None:
    """Quiet, local-only Prefect defaults, unless the user set them."""
    # Offline machines log telemetry errors from the server otherwise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _report(summary: dict) -> str:
    from flows.pipeline import headline

    lines = ["", "segflow: pipeline finished"]
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
    return "\n".join(lines)


@contextlib.contextmanager
def _prefect_api(root: Path) -> Iterator[str]:
    """The Prefect API to record the run on: ``PREFECT_API_URL`` when set, else a temporary local server
    (its database in ``PREFECT_HOME``, by default the project's ``.segflow/prefect``), stopped afterwards."""
    from flows.server import local_server

    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    home = Path(os.environ.get("PREFECT_HOME") or root / ".segflow" / "prefect")
    print(f"segflow: starting a temporary Prefect server (database in {home})", file=sys.stderr, flush=True)
    # If the server dies mid-run, interrupt the run: there is nowhere left to record it.
    signal.signal(signal.SIGUSR1, _on_server_gone)
    main_thread = threading.main_thread().ident

    def gone(_code: int) -> None:
        _server_gone.set()
        signal.pthread_kill(main_thread, signal.SIGUSR1)

    with local_server(home, on_exit=gone) as api:
        try:
            yield api
        finally:
            # Send the run's last log lines before the server goes.
            from prefect.logging.handlers import APILogWorker

            if not _server_gone.is_set():
                APILogWorker.drain_all(timeout=5)


def run(root: Path, force: bool, retries: int) -> int:
    """``segflow run``: pre-flight checks, then the flow against a Prefect server."""
    from prefect import tags
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from flows._lock import check_free
    from flows.pipeline import pipeline
    from flows.server import PROCESS_TAG, crash_orphaned_runs
    from tasks._guard import process_identity
    from tasks.params import load_params

    load_params(root / "params.yaml")  # every stage's params, before anything starts or is deleted
    check_free(root)
    with _prefect_api(root) as api:
        for name in crash_orphaned_runs(api):
            print(f"segflow: flow run {name} was left RUNNING by a killed segflow; marked CRASHED", file=sys.stderr)
        settings = {PREFECT_API_URL: api}
        if not os.environ.get("PREFECT_API_URL"):
            # A local temporary server has no flaky network to ride out; if it is gone, fail fast.
            settings[PREFECT_CLIENT_MAX_RETRIES] = 1
        with temporary_settings(settings), tags("segflow", PROCESS_TAG + process_identity()):
            summary = pipeline(root=str(root), force=force, retries=retries)
    print(_report(summary))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the DVC project (default: .)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the pipeline (Prefect flow over the DVC stages)")
    run_parser.add_argument("--force", action="store_true", help="rerun every stage even if nothing changed")
    run_parser.add_argument("--retries", type=int, default=0, help="Prefect retries per stage (default 0)")
    commands.add_parser("stages", help="list the pipeline's stages in run order")
    args = parser.parse_args(argv)

    root = args.root.resolve()
    if not (root / "dvc.yaml").is_file():
        print(
            f"segflow: error: {root / 'dvc.yaml'} not found; run from the project root or pass --root", file=sys.stderr
        )
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    _prefect_defaults()
    try:
        if args.command == "stages":
            from flows.pipeline import stage_order

            print("\n".join(stage_order(root)))
            return 0
        return run(root, args.force, args.retries)
    except BaseException as error:  # every way out gets one line
        return _fail(error, args.debug)


def _fail(error: BaseException, debug: bool) -> int:
    """Print one line for ``error`` (and its traceback with ``--debug``); return the exit status."""
    from prefect.exceptions import TerminationSignal

    from flows.pipeline import StageFailed
    from tasks._common import SegflowError

    if debug:
        traceback.print_exception(error)
    if _server_gone.is_set():  # whatever surfaced (often a refused connection), this is why
        print(
            "segflow: error: the temporary Prefect server stopped during the run; the running stage was stopped "
            "and its last good outputs are in place (server log: .segflow/prefect/server.log)",
            file=sys.stderr,
            flush=True,
        )
        # Skip Prefect's exit-time log upload: there is no server to take it.
        os._exit(1)
    if isinstance(error, KeyboardInterrupt | Terminated | TerminationSignal):
        name = "SIGINT" if isinstance(error, KeyboardInterrupt) else "SIGTERM"
        print(
            f"segflow: stopped by {name}: the running stage was stopped and its last good outputs are in place; "
            "the flow run is recorded as crashed",
            file=sys.stderr,
        )
        return 130 if name == "SIGINT" else 143
    if isinstance(error, StageFailed | SegflowError):
        print(f"segflow: error: {error}", file=sys.stderr)
        return 1
    if isinstance(error, SystemExit):
        return error.code if isinstance(error.code, int) else 1
    if not debug:
        traceback.print_exception(error)
    return 1


if __name__ == "__main__":
    sys.exit(main())
