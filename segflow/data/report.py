"""The data report ingest writes: what came in, how it splits, and every problem found.

``report.json`` for programs and ``report.md`` for people (the Prefect flow
shows it as an artifact). Both are functions of the data alone (no times, no
machine names), so an unchanged dataset gives byte-identical reports and DVC
sees no change.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from segflow.params import IngestParams

_SPLITS = ("train", "val", "test")


def describe_source(cfg: IngestParams) -> dict:
    """The source as params describe it."""
    if cfg.source == "synthetic":
        return {"kind": "synthetic", "num_images": cfg.synthetic.num_images, "image_size": cfg.synthetic.image_size}
    return {"kind": "folder", "path": str(cfg.path), "layout": cfg.layout, "on_bad": cfg.on_bad}


def build(manifest: pd.DataFrame, classes: list[str], problems: list[dict], source: dict) -> dict:
    """Counts per split, class pixel shares per split, image sizes and channels, problems.

    Args:
        manifest: ingest's manifest (one row per sample, ``px_<class>`` and ``px_ignored`` columns).
        problems: the report records of every problem (see :meth:`segflow.data.checks.Problem.as_record`).
    """
    pixel_columns = [f"px_{name}" for name in classes]
    objects = f"n_{classes[0]}" in manifest  # task: instance: objects per category, not pixel shares
    splits = {}
    for split in _SPLITS:
        rows = manifest[manifest["split"] == split]
        if rows.empty:
            continue
        if objects:
            counts = {name: int(rows[f"n_{name}"].sum()) for name in classes}
            splits[split] = {
                "images": len(rows),
                "groups": int(rows["group"].nunique()),
                "objects": counts,
                "crowd": int(rows["n_crowd"].sum()),
                "without_objects": int((rows[[f"n_{n}" for n in classes]].sum(axis=1) == 0).sum()),
            }
            continue
        labelled = int(rows[pixel_columns].to_numpy().sum())
        ignored = int(rows["px_ignored"].sum())
        splits[split] = {
            "images": len(rows),
            "groups": int(rows["group"].nunique()),
            "class_share": {
                name: round(int(rows[f"px_{name}"].sum()) / labelled, 6) if labelled else None for name in classes
            },
            "ignored_share": round(ignored / (labelled + ignored), 6) if labelled + ignored else None,
        }
    sizes = manifest.groupby(["width", "height"]).size().sort_values(ascending=False)
    return {
        "source": source,
        "classes": classes,
        "images": len(manifest),
        "splits": splits,
        "sizes": {f"{w}x{h}": int(n) for (w, h), n in sizes.items()},
        "channels": {str(c): int(n) for c, n in manifest["channels"].value_counts().sort_index().items()},
        "skipped": len(problems),
        "problems": problems,
    }


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2) + "\n"


def to_markdown(report: dict) -> str:
    """The report for people: a splits table, class shares, sizes, problems."""
    classes = report["classes"]
    source = report["source"]
    where = source.get("path", f"{source.get('num_images')} synthetic scenes")
    lines = [
        "# segflow data report",
        "",
        f"**{report['images']} images** from `{where}` ({source['kind']}"
        + (f", layout {source['layout']}" if "layout" in source else "")
        + f"); {report['skipped']} problem(s).",
        "",
    ]
    if any("objects" in info for info in report["splits"].values()):
        lines += _object_table(report)
    else:
        lines += [
            "| split | images | groups | " + " | ".join(classes) + " | ignored |",
            "|---|---:|---:|" + "---:|" * len(classes) + "---:|",
        ]
        for split, info in report["splits"].items():
            shares = " | ".join(_percent(info["class_share"][name]) for name in classes)
            lines.append(
                f"| {split} | {info['images']} | {info['groups']} | {shares} | {_percent(info['ignored_share'])} |"
            )
        lines += ["", "Class columns: share of labelled pixels in the split.", ""]
    sizes = ", ".join(f"{size} ({n})" for size, n in list(report["sizes"].items())[:8])
    more = f" and {len(report['sizes']) - 8} more" if len(report["sizes"]) > 8 else ""
    channels = ", ".join(f"{n} with {c} channel{'s' if c != '1' else ''}" for c, n in report["channels"].items())
    lines += [f"Image sizes: {sizes}{more}. Channels: {channels}.", ""]
    if report["problems"]:
        lines += ["## Problems", "", "| file | problem | action |", "|---|---|---|"]
        for item in report["problems"]:
            message = item["message"].removeprefix(f"{item['file']}: ").replace("|", "\\|")
            lines.append(f"| `{item['file']}` | {message} | {item['action']} |")
    else:
        lines.append("No problems found.")
    return "\n".join(lines) + "\n"


def _object_table(report: dict) -> list[str]:
    """task: instance: objects per category and split, crowd regions, images without objects."""
    classes = report["classes"]
    lines = [
        "| split | images | groups | " + " | ".join(classes) + " | crowd | images without objects |",
        "|---|---:|---:|" + "---:|" * len(classes) + "---:|---:|",
    ]
    for split, info in report["splits"].items():
        counts = " | ".join(str(info["objects"][name]) for name in classes)
        tail = f"{info['crowd']} | {info['without_objects']}"
        lines.append(f"| {split} | {info['images']} | {info['groups']} | {counts} | {tail} |")
    return [*lines, "", "Category columns: objects (instances) in the split; crowd regions are ignored in scoring.", ""]


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def summary_line(report: dict, where: Path) -> str:
    """One log line: counts per split and problems."""
    splits = ", ".join(f"{split} {info['images']}" for split, info in report["splits"].items())
    return f"{report['images']} images ({splits}) into {where}; {report['skipped']} skipped"
