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
import logging
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


def _quiet_console() -> None:
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


def _prefect_defaults() -> None:
    """Quiet, local-only Prefect defaults, unless the user set them."""
    # Offline machines log telemetry errors from the server otherwise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _report(summary: dict) -> str:
    from flows._summary import headline

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
        from flows.registry import summary_line

        lines.append(f"  registry: {summary_line(summary['registration'])}")
    return "\n".join(lines)


@contextlib.contextmanager
def _prefect_api(root: Path) -> Iterator[str]:
    """The Prefect API to record the run on: ``PREFECT_API_URL`` or the project's ``segflow server`` when
    there is one, else a temporary local server (same database, ``.segflow/prefect``) stopped afterwards."""
    from flows.ops import find_api, prefect_home
    from flows.server import local_server

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


def run(
    root: Path, force: bool, stages: list[str] | None, retries: int, debug: bool = False, register: bool = False
) -> int:
    """``segflow run``: pre-flight checks, then the flow against a Prefect server."""
    from prefect import tags
    from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    from flows._lock import check_free
    from flows.ops import find_api
    from flows.pipeline import pipeline
    from flows.server import PROCESS_TAG, crash_orphaned_runs
    from tasks._common import SegflowError
    from tasks._guard import process_identity
    from tasks.params import load_params

    load_params(root / "params.yaml")  # every stage's params, before anything starts or is deleted
    check_free(root)
    if not debug:
        _quiet_console()
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


def _api_or_fail(root: Path) -> str:
    from flows.ops import require_api

    return require_api(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the DVC project (default: .)")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="run the pipeline (Prefect flow over the DVC stages)")
    run_parser.add_argument("--force", action="store_true", help="rerun every stage even if nothing changed")
    run_parser.add_argument("--stage", action="append", dest="stages", help="run only this stage (and its inputs)")
    run_parser.add_argument("--retries", type=int, default=0, help="retries of a killed stage (default 0)")
    run_parser.add_argument("--register", action="store_true", help="register the model after the stages")
    commands.add_parser("stages", help="list the pipeline's stages in run order")
    params_parser = commands.add_parser("params", help="apply a ready configuration (e.g. configs/isbi2012.yaml)")
    params_parser.add_argument("config", type=Path, help="YAML file of the params to change")
    server_parser = commands.add_parser("server", help="a local Prefect server and dashboard on 127.0.0.1")
    server_parser.add_argument("--port", type=int, default=4200, help="port (default 4200)")
    deploy_parser = commands.add_parser("deploy", help="create/update the scheduled 'retrain' deployment")
    deploy_parser.add_argument("--cron", help="schedule (default: schedule.cron in params.yaml)")
    commands.add_parser("worker", help="run a worker that executes scheduled runs, in this project")
    register_parser = commands.add_parser("register", help="register the trained model (GTO version, card, gate)")
    register_parser.add_argument(
        "--commit", action="store_true", default=None, help="commit dvc.lock, params and metrics first"
    )
    models_parser = commands.add_parser("models", help="registered versions, stages, metrics and dates")
    models_parser.add_argument("name", nargs="?", help="model name (default: register.model)")
    predict_parser = commands.add_parser("predict", help="segment images with a registered model")
    predict_parser.add_argument("inputs", nargs="+", type=Path, help="image files and folders")
    predict_parser.add_argument("--model", default=None, help="NAME, NAME@vX.Y.Z or NAME#stage (default: NAME#prod)")
    predict_parser.add_argument("--out", type=Path, required=True, help="folder for <stem>.png class-id masks")
    predict_parser.add_argument("--overlay", action="store_true", help="also write <stem>_overlay.png")
    predict_parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    predict_parser.add_argument("--device", default=None, help="torch device (default: CUDA when there is one)")
    compare_parser = commands.add_parser(
        "compare", help="queue one DVC experiment per arch/encoder/loss, run them, write docs/compare/<dataset>.md"
    )
    compare_parser.add_argument("--archs", required=True, help="comma-separated, e.g. Unet,FCN,SegNet,DeepLabV3Plus")
    compare_parser.add_argument("--encoders", default=None, help="comma-separated (default: train.encoder)")
    compare_parser.add_argument("--losses", default=None, help="comma-separated (default: train.loss)")
    compare_parser.add_argument(
        "--set", action="append", default=[], dest="sets", metavar="KEY=VALUE", help="params for every run"
    )
    compare_parser.add_argument("--dataset", default=None, help="table name (default: from ingest)")
    compare_parser.add_argument("--jobs", type=int, default=1, help="experiments at a time (1 keeps timings fair)")
    compare_parser.add_argument("--queue-only", action="store_true", help="queue; run later with dvc queue start")
    compare_parser.add_argument("--table-only", action="store_true", help="tabulate experiments already run")
    compare_parser.add_argument("--out", type=Path, default=Path("docs/compare"), help="table folder")
    compare_parser.add_argument(
        "--force", action="store_true", help="rerun every stage, even runs DVC's run cache holds (new timings)"
    )
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
        return _dispatch(args, root)
    except BaseException as error:  # every way out gets one line
        return _fail(error, args.debug)


def _dispatch(args: argparse.Namespace, root: Path) -> int:
    from flows import ops

    if args.command == "stages":
        from flows._plan import stage_order

        print("\n".join(stage_order(root)))
        return 0
    if args.command == "compare":
        return _compare(root, args)
    if args.command == "params":
        from flows._config import apply

        changed = apply(root, args.config)
        print(
            f"segflow: {len(changed)} param(s) changed in params.yaml"
            + (f" ({', '.join(changed)}); run `dvc repro` or `segflow run`" if changed else "")
        )
        return 0
    if args.command == "server":
        return ops.serve(root, args.port)
    if args.command == "deploy":
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: _api_or_fail(root)}):
            info = ops.deploy(root, args.cron)
        print(
            f"segflow: deployment {info['name']} (id {info['id']}) runs on work pool '{info['work_pool']}' at "
            f"'{info['cron']}' ({info['timezone']}); start a worker with `segflow worker`"
        )
        return 0
    if args.command == "worker":
        api = _api_or_fail(root)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):
            return ops.worker(root, api)
    if args.command == "register":
        from flows import registry

        print(f"segflow: {registry.summary_line(registry.register(root, args.commit))}")
        return 0
    if args.command == "models":
        return _models(root, args.name)
    if args.command == "predict":
        return _predict(root, args)
    return run(root, args.force, args.stages, args.retries, args.debug, args.register)


def _compare(root: Path, args: argparse.Namespace) -> int:
    from flows.compare import compare
    from tasks.params import load_params

    train = load_params(root / "params.yaml").train
    split = lambda text, default: [v.strip() for v in (text or default).split(",") if v.strip()]  # noqa: E731
    command = " ".join(
        ["segflow compare", f"--archs {args.archs}"]
        + [f"--{k} {v}" for k, v in (("encoders", args.encoders), ("losses", args.losses)) if v]
        + [f"--set {s}" for s in args.sets]
        + ([f"--dataset {args.dataset}"] if args.dataset else [])
    )
    md, csv, rows = compare(
        root,
        split(args.archs, ""),
        split(args.encoders, train.encoder),
        split(args.losses, train.loss),
        args.sets,
        dataset=args.dataset,
        jobs=args.jobs,
        run=not args.queue_only,
        queue_experiments=not args.table_only,
        out=args.out,
        command=command,
        force=args.force,
    )
    done = sum(r.get("status") == "done" for r in rows)
    print(f"segflow: {done} of {len(rows)} experiments in {md.relative_to(root)} and {csv.relative_to(root)}")
    return 0 if done == len(rows) or args.queue_only else 1


def _models(root: Path, name: str | None) -> int:
    from flows.models import versions
    from tasks.params import load_params

    params = load_params(root / "params.yaml")
    name = name or params.register.model
    found = versions(root, name)
    if not found:
        print(f"segflow: no version of {name} is registered yet (segflow register)")
        return 0
    metric = params.register.metric
    print(f"{'version':<10} {'stages':<12} {metric:>10} {'IoU':>7} {'Dice':>7}  {'registered':<25} commit")
    for v in found:
        value = v.info.get("metric_value")
        cells = [
            f"{x:.4f}" if isinstance(x, float) else "-"
            for x in (value, v.info.get("iou_macro"), v.info.get("dice_macro"))
        ]
        print(
            f"{v.version:<10} {','.join(v.stages) or '-':<12} {cells[0]:>10} {cells[1]:>7} {cells[2]:>7}  "
            f"{v.created_at:<25} {v.commit[:10]}"
        )
    return 0


def _predict(root: Path, args: argparse.Namespace) -> int:
    from flows import predict
    from flows.models import load_model
    from tasks.params import load_params

    spec = args.model or f"{load_params(root / 'params.yaml').register.model}#prod"
    predictor = load_model(spec, root, args.backend, args.device)
    files = list(predict.inputs(args.inputs))
    written, errors = predict.run(predictor, files, args.out, args.overlay, progress=sys.stderr.isatty())
    print(f"segflow: {written} mask(s) written to {args.out}" + (f"; {len(errors)} input(s) failed" if errors else ""))
    return 3 if errors else 0


def _fail(error: BaseException, debug: bool) -> int:
    """Print one line for ``error`` (and its traceback with ``--debug``); return the exit status."""
    from prefect.exceptions import TerminationSignal

    from flows._stage import StageFailed
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
