"""The ``segflow`` command: parse the arguments, call one library function, print one screen.

Hyperparameters are not command-line flags on purpose: they live in params.yaml, where DVC sees
them (``dvc exp run -S train.lr=0.001``). Every expected failure prints one line
(``segflow: error: ...``); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback
from pathlib import Path

from segflow.ops.run import Terminated, gone_reason, on_sigterm, prefect_defaults, run, server_gone


def _api_or_fail(root: Path) -> str:
    from segflow.ops.home import require_api

    return require_api(root)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="segflow",
        description="Reproducible image segmentation: a Prefect flow over the DVC stages "
        "ingest, augment, train and evaluate, a model registry, and prediction.",
        epilog="Hyperparameters live in params.yaml (dvc exp run -S train.lr=0.001), not in flags. "
        "Expected failures print one line; --debug adds the traceback.",
    )
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
    commands.add_parser(
        "freeze-test", help="keep today's test images as the test split as data grows (ingest.test_ids)"
    )
    server_parser = commands.add_parser("server", help="a local Prefect server and dashboard on 127.0.0.1")
    server_parser.add_argument("--port", type=int, default=4200, help="port (default 4200)")
    server_parser.add_argument(
        "--database",
        metavar="URL",
        help="the team's PostgreSQL, postgresql://USER:PASSWORD@HOST:5432/DB (default: "
        "PREFECT_API_DATABASE_CONNECTION_URL, else SQLite in the Prefect home)",
    )
    deploy_parser = commands.add_parser("deploy", help="create/update the scheduled 'retrain' deployment")
    deploy_parser.add_argument("--cron", help="schedule (default: schedule.cron in params.yaml)")
    commands.add_parser("worker", help="run a worker that executes scheduled runs, in this project")
    register_parser = commands.add_parser("register", help="register the trained model (GTO version, card, gate)")
    register_parser.add_argument(
        "--commit", action="store_true", default=None, help="commit dvc.lock, params and metrics first"
    )
    register_parser.add_argument(
        "--allow-dirty", action="store_true", help="register despite uncommitted code changes (the card lists them)"
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
    compare_parser.add_argument(
        "--archs", default=None, help="comma-separated, e.g. Unet,FCN,SegNet,DeepLabV3Plus (task: instance: MaskRCNN)"
    )
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
    signal.signal(signal.SIGTERM, on_sigterm)
    prefect_defaults()
    try:
        return _dispatch(args, root)
    except BaseException as error:  # every way out gets one line
        return _fail(error, args.debug)


def _dispatch(args: argparse.Namespace, root: Path) -> int:
    from segflow.ops import deploy, worker

    if args.command == "stages":
        from segflow.ops.plan import stage_order

        print("\n".join(stage_order(root)))
        return 0
    if args.command == "compare":
        return _compare(root, args)
    if args.command == "params":
        from segflow.config import apply

        changed = apply(root, args.config)
        print(
            f"segflow: {len(changed)} param(s) changed in params.yaml"
            + (f" ({', '.join(changed)}); run `dvc repro` or `segflow run`" if changed else "")
        )
        return 0
    if args.command == "freeze-test":
        from segflow.config import freeze_test

        count, reason = freeze_test(root)
        print(
            f"segflow: froze {count} test ids into params.yaml ingest.test_ids: they stay the test split, images "
            "added later go to train/val; commit params.yaml"
            if count
            else f"segflow: nothing to freeze: {reason}"
        )
        return 0
    if args.command == "server":
        return _server(root, args.port, args.database)
    if args.command == "deploy":
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: _api_or_fail(root)}):
            info = deploy.deploy(root, args.cron)
        print(
            f"segflow: deployment {info['name']} (id {info['id']}) runs on work pool '{info['work_pool']}' at "
            f"'{info['cron']}' ({info['timezone']}); a run silent for {info['crash_after_s']} s is marked CRASHED; "
            "start a worker with `segflow worker`"
        )
        return 0
    if args.command == "worker":
        api = _api_or_fail(root)
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):
            return worker.worker(root, api, args.debug)
    if args.command == "register":
        from segflow.registry import register

        outcome = register.register(root, args.commit, allow_dirty=args.allow_dirty)
        for line in [*outcome.get("completed", []), *outcome.get("warnings", [])]:
            print(f"segflow: warning: {line}", file=sys.stderr)
        print(f"segflow: {register.summary_line(outcome)}")
        return 0
    if args.command == "models":
        return _models(root, args.name)
    if args.command == "predict":
        return _predict(root, args)
    return run(root, args.force, args.stages, args.retries, args.debug, args.register)


def _server(root: Path, port: int, database: str | None) -> int:
    from segflow.ops import home
    from segflow.ops.database import check_database, server_database

    url = server_database(database)
    if url is None:
        return home.serve(root, port)
    check_database(url)  # one line now, not Prefect's traceback after its start-up
    return home.serve(root, port, database=url)


def _compare(root: Path, args: argparse.Namespace) -> int:
    from segflow.errors import SegflowError
    from segflow.ops.compare import compare
    from segflow.params import load_params

    train = load_params(root / "params.yaml").train
    split = lambda text, default: [v.strip() for v in (text or default).split(",") if v.strip()]  # noqa: E731
    if args.archs is None and train.arch != "MaskRCNN":
        raise SegflowError("segflow compare: give --archs, e.g. --archs Unet,FPN,SegNet")
    command = " ".join(
        ["segflow compare"]
        + ([f"--archs {args.archs}"] if args.archs else [])
        + [f"--{k} {v}" for k, v in (("encoders", args.encoders), ("losses", args.losses)) if v]
        + [f"--set {s}" for s in args.sets]
        + ([f"--dataset {args.dataset}"] if args.dataset else [])
    )
    md, csv, rows = compare(
        root,
        split(args.archs, train.arch),
        split(args.encoders, train.encoder),
        split(args.losses, getattr(train, "loss", "-")),
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
    from segflow.params import load_params
    from segflow.registry.fetch import versions

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
    from segflow.params import load_params
    from segflow.registry.fetch import load_model
    from segflow.semantic import predict

    spec = args.model or f"{load_params(root / 'params.yaml').register.model}#prod"
    predictor = load_model(spec, root, args.backend, args.device)
    files = list(predict.inputs(args.inputs, out=args.out))
    if getattr(predictor, "card", None) is not None and getattr(predictor.card, "task", "semantic") == "instance":
        from segflow.instance import predict as instances
        from segflow.params import InstanceParams, load_params

        params = load_params(root / "params.yaml") if (root / "params.yaml").is_file() else None
        threshold = params.evaluate.count_threshold if isinstance(params, InstanceParams) else 0.5
        written, errors = instances.run(
            predictor, files, args.out, args.overlay, progress=sys.stderr.isatty(), count_threshold=threshold
        )
        print(
            f"segflow: {written} image(s) predicted into {args.out} (instance ids .png, COCO results .json)"
            + (f"; {len(errors)} input(s) failed" if errors else "")
        )
        return 3 if errors else 0
    params_file = root / "params.yaml"
    background = load_params(params_file).background if params_file.is_file() else None
    written, errors = predict.run(
        predictor, files, args.out, args.overlay, progress=sys.stderr.isatty(), background=background
    )
    print(f"segflow: {written} mask(s) written to {args.out}" + (f"; {len(errors)} input(s) failed" if errors else ""))
    return 3 if errors else 0


def _fail(error: BaseException, debug: bool) -> int:
    """Print one line for ``error`` (and its traceback with ``--debug``); return the exit status."""
    from prefect.exceptions import TerminationSignal

    from segflow.errors import SegflowError
    from segflow.ops.runner import StageFailed

    if debug:
        traceback.print_exception(error)
    if server_gone.is_set():  # whatever surfaced (often a refused connection), this is why
        reason = gone_reason[-1] if gone_reason else "the Prefect server stopped during the run"
        print(f"segflow: error: {reason}; the running stage was stopped", file=sys.stderr, flush=True)
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
