"""The ``segflow`` command.

``segflow run`` runs the whole pipeline through the Prefect flow;
``segflow stages`` lists the stages in the order they run. Hyperparameters are
not command-line flags on purpose: they live in params.yaml, where DVC sees
them (``dvc exp run -S train.lr=0.001``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _prefect_defaults() -> None:
    """Quiet, local-only Prefect defaults, unless the user set them."""
    # Offline machines log telemetry errors from the (temporary) server otherwise.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # Without PREFECT_API_URL, Prefect starts a temporary local server; its first start
    # (database migrations) can take longer than the default 20 s on a small machine.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def _report(summary: dict) -> str:
    from flows.pipeline import headline

    lines = ["", "segflow: pipeline finished"]
    lines += [f"  {s['stage']:<10} {s['status']:<8} {s['seconds']:>7.1f}s" for s in summary["stages"]]
    outputs = summary["outputs"]
    lines += [
        f"  metrics:     {outputs['metrics']}  (dvc metrics show)",
        f"  plots:       {outputs['predictions']}, training curves in "
        f"{Path(outputs['training_metrics']).parent}/plots  (dvc plots show)",
        f"  model:       {outputs['model']}/",
    ]
    if summary["metrics"]:
        lines.append(f"  {headline(summary['metrics'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="segflow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("."), help="the DVC project (default: .)")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run the pipeline (Prefect flow over the DVC stages)")
    run.add_argument("--force", action="store_true", help="rerun every stage even if nothing changed")
    run.add_argument("--retries", type=int, default=0, help="Prefect retries per stage (default 0)")
    commands.add_parser("stages", help="list the pipeline's stages in run order")
    args = parser.parse_args(argv)

    root = args.root.resolve()
    if not (root / "dvc.yaml").is_file():
        print(
            f"segflow: error: {root / 'dvc.yaml'} not found; run from the project root or pass --root", file=sys.stderr
        )
        return 2

    _prefect_defaults()
    from flows.pipeline import StageFailed, pipeline, stage_order
    from tasks._common import SegflowError

    if args.command == "stages":
        print("\n".join(stage_order(root)))
        return 0
    try:
        summary = pipeline(root=str(root), force=args.force, retries=args.retries)
    except (StageFailed, SegflowError) as error:
        print(f"segflow: error: {error}", file=sys.stderr)
        return 1
    print(_report(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
