"""What a run tells the dashboard: its summary (stages, outcome, provenance), metrics and curves.

Published for every run, failed ones included, so the flow run page answers
"what ran, what failed and why, on which code, params and data, and did the
model get better"."""

from __future__ import annotations

import csv
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from segflow.layout import LIVE_DIR, METRICS, MODEL_DIR, PREDICTIONS, REPORT_MD, read_scores
from segflow.params import load_params

#: The headline metric a run compares with the previous one.
HEADLINE = ("iou", "macro")
_LABEL = {"iou": "IoU", "dice": "Dice"}


def read_metrics(root: Path) -> dict | None:
    """The test scores of the last evaluate (per class included), or None."""
    return read_scores(root / load_params(root / "params.yaml").paths.evaluate)


def outputs(root: Path) -> dict:
    """Where the pipeline's results are, the test metrics and the data report (if the stages ran)."""
    paths = load_params(root / "params.yaml").paths
    report = root / paths.ingest / REPORT_MD
    return {
        "outputs": {
            "data_report": str(paths.ingest / REPORT_MD),
            "metrics": str(paths.evaluate / METRICS),
            "training_metrics": str(paths.train / LIVE_DIR / "metrics.json"),
            "predictions": str(paths.evaluate / PREDICTIONS),
            "model": str(paths.train / MODEL_DIR),
        },
        "metrics": read_metrics(root),
        "data_report": report.read_text(encoding="utf-8") if report.is_file() else None,
    }


def headline(metrics: dict) -> str:
    """The test scores in one line: macro IoU and Dice, per-class IoU."""
    iou, dice = metrics["iou"], metrics["dice"]
    scored = {name: value for name, value in iou["per_class"].items() if value is not None}
    per_class = ", ".join(f"{name} {value:.3f}" for name, value in scored.items())
    mistakes = (metrics.get("confusion") or {}).get("most_confused") or []
    confused = "; most confused: " + ", ".join(
        f"{m['true']} as {m['predicted']} {100 * m['share']:.1f} %" for m in mistakes[:2]
    )
    return (
        f"test IoU (macro over {len(scored)} classes) {iou['macro']:.4f}, Dice (macro) {dice['macro']:.4f} "
        f"on {metrics['images']} images; IoU per class: {per_class}" + (confused if mistakes else "")
    )


def metric_change(before: dict | None, after: dict | None) -> str:
    """The headline metric against the one before this run."""
    group, key = HEADLINE
    if not after:
        return "no test metrics yet"
    now = after[group][key]
    if not before:
        return f"test {_LABEL[group]} {key} {now:.4f} (first evaluation)"
    # Only like with like: the same classes, scored on the same test images.
    classes = [list(m.get("iou", {}).get("per_class") or []) for m in (before, after)]
    if all(classes) and classes[0] != classes[1]:  # (a metrics.json of headline numbers names no classes)
        return f"test {_LABEL[group]} {key} {now:.4f} (not compared: the classes changed since the last run)"
    splits = [m.get("split_sha256") for m in (before, after)]
    if None not in splits and splits[0] != splits[1]:
        return (
            f"test {_LABEL[group]} {key} {now:.4f} (not compared: the test split changed since the last run, "
            f"{before.get('images')} -> {after.get('images')} images; `segflow freeze-test` keeps it fixed)"
        )
    then = before[group][key]
    if then == now:
        return f"test {_LABEL[group]} {key} {now:.4f} (unchanged)"
    return f"test {_LABEL[group]} {key} {now:.4f} ({now - then:+.4f} against {then:.4f} before this run)"


def training_curves(root: Path) -> list[dict]:
    """Per-epoch training curves from DVCLive's files, one row per epoch (for a table artifact)."""
    plots = root / load_params(root / "params.yaml").paths.train / LIVE_DIR / "plots" / "metrics"
    columns = {"train loss": "train/loss.tsv", "val loss": "val/loss.tsv", "val IoU": "val/iou_macro.tsv"}
    rows: dict[int, dict] = {}
    for name, relative in columns.items():
        path = plots / relative
        if not path.is_file():
            continue
        with path.open() as handle:
            for index, record in enumerate(csv.DictReader(handle, delimiter="\t")):
                value = next(v for k, v in record.items() if k not in ("step", "timestamp"))
                rows.setdefault(index + 1, {"epoch": index + 1})[name] = round(float(value), 4)
    return [rows[epoch] for epoch in sorted(rows)]


def publish(stages: list[dict], result: dict, failure: str | None) -> str:
    """Create the run's artifacts; return the summary's first line."""
    ran = [s["stage"] for s in stages if s["status"] == "ran"]
    if failure:
        first = f"**Failed**: {failure}"
    elif not ran:
        first = "**Nothing changed**: every stage is up to date, nothing was retrained."
    else:
        first = f"**Completed**: ran {', '.join(ran)}."
    metrics, origin = result["metrics"], result["provenance"]
    lines = ["# segflow pipeline", "", first, "", "| stage | status | seconds | note |", "|---|---|---:|---|"]
    lines += [f"| {s['stage']} | {s['status']} | {s['seconds']} | {s.get('note', '')} |" for s in stages]
    lines += ["", f"**{result['change']}**"]
    if result.get("registration"):
        from segflow.registry.register import summary_line

        lines += ["", f"Registration: {summary_line(result['registration'])}"]
    if metrics:
        lines += ["", headline(metrics), "", f"Reduction: {metrics['reduction']}"]
    lines += [
        "",
        "## Provenance",
        "",
        f"- git commit: `{origin['commit']}`" + (" (with uncommitted changes)" if origin["dirty"] else ""),
        f"- params digest: `{origin['params_sha256']}`",
        f"- data (ingest output) md5: `{origin['data_md5']}`",
        f"- model md5: `{origin['model_md5']}`",
        "",
        *[f"- {name}: `{path}`" for name, path in result["outputs"].items()],
    ]
    create_markdown_artifact(
        key="segflow-pipeline-summary",
        markdown="\n".join(lines),
        description="Run summary: stages, outcome, provenance",
    )
    if metrics:
        iou, dice = metrics["iou"], metrics["dice"]
        create_table_artifact(
            key="segflow-test-metrics",
            table=[{"class": c, "iou": iou["per_class"][c], "dice": dice["per_class"][c]} for c in iou["per_class"]],
            description="Per-class IoU and Dice on the test split (pixel counts summed over images).",
        )
    curves = training_curves(result["root"])
    if curves:
        create_table_artifact(key="segflow-training-curves", table=curves, description="Training curves per epoch")
    if result["data_report"]:
        create_markdown_artifact(
            key="segflow-data-report",
            markdown=result["data_report"],
            description="What ingest read: images per split, class shares, sizes, problems found",
        )
    return first.replace("**", "")


def publish_failure(reason: str) -> None:
    """The summary of a run that failed before any stage started (bad params, a busy project)."""
    create_markdown_artifact(
        key="segflow-pipeline-summary",
        markdown=f"# segflow pipeline\n\n**Failed before any stage ran**: {reason}\n",
        description="segflow run",
    )
