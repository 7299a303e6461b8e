"""The model card of a registered version: what the model is, how it scores, what made it, how to get it."""

from __future__ import annotations

import json
from pathlib import Path

from segflow.layout import MODEL_DIR, REPORT_JSON
from segflow.params import Params


def exports(root: Path, params: Params, model: dict) -> dict:
    """The export stage's formats of this very model (its folder's card names the same weights), each with
    the folder it is in, for fetching by version; {} when there are none or they belong to another model."""
    folder = params.paths.export
    try:
        card = json.loads((root / folder / "model.json").read_text())
    except (OSError, ValueError):
        return {}
    if card.get("weights_sha256") != model.get("weights_sha256"):
        return {}
    return {name: {**entry, "folder": folder.as_posix()} for name, entry in card.get("exports", {}).items()}


def build(root: Path, params: Params, metrics: dict, info: dict, split: dict, gate: dict) -> dict:
    """The JSON card: the model's own card (model.json) plus test scores, data, params and registration.

    Args:
        split: the test split scored (:func:`segflow.registry.rescore.test_split`: hash, ids, frozen).
        gate: the champion it was compared with, on which split, and the decision.
    """
    model = json.loads((root / params.paths.train / MODEL_DIR / "model.json").read_text())
    report_path = root / params.paths.ingest / REPORT_JSON
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    name, version = params.register.model, info["version"]
    return {
        "model": name,
        "version": version,
        "task": model.get("task", "semantic"),
        "architecture": {
            k: model[k] for k in ("arch", "encoder", "encoder_depth", "decoder_channels", "width") if k in model
        },
        "classes": model["classes"],
        "input": {
            "channels": model["in_channels"],
            "train_size": model["train_size"],
            "pad_divisor": model["pad_divisor"],
            "normalisation": {
                "mean": model["mean"],
                "std": model["std"],
                "scale": "pixels / 255, then (x - mean) / std",
            },
        },
        "test": {
            "images": metrics["images"],
            "reduction": metrics["reduction"],
            "iou": metrics["iou"],
            "dice": metrics["dice"],
            "pixel_accuracy": metrics.get("pixel_accuracy"),
            # task: instance: COCO mask/box AP and the object counts.
            **{key: metrics[key] for key in ("segm", "bbox", "counts") if key in metrics},
        },
        # Which images the scores are on: the gate of a later version compares against this split.
        "test_split": split,
        "data": {
            "ingest_md5": info["data_md5"],
            "images": report.get("images"),
            "splits": {k: v["images"] for k, v in report.get("splits", {}).items()},
            "source": report.get("source"),
        },
        "params": {
            "seed": params.seed,
            "augment": params.augment.model_dump(mode="json"),
            "train": params.train.model_dump(mode="json"),
        },
        "training": model.get("training", {}),
        "weights_sha256": model.get("weights_sha256"),
        "exports": exports(root, params, model),
        "registration": {
            "registered_at": info["registered_at"],
            "source_commit": info["source_commit"],
            "model_md5": info["model_md5"],
            "params_sha256": info["params_sha256"],
            "gate": {"metric": info["metric"], "value": info["metric_value"], "promoted_to": info["promoted_to"]}
            | gate,
        },
        "fetch": {
            "segflow": f"segflow predict --model {name}@{version} IMAGES... --out DIR",
            "python": f'from segflow import load_model; model = load_model("{name}@{version}")',
            "dvc": f"dvc artifacts get <this repository> {name} --rev {version} -o {name}-{version}",
        },
    }


def markdown(card: dict) -> str:
    """The card for people."""
    arch, test = card["architecture"], card["test"]
    lines = [
        f"# {card['model']} {card['version']}",
        "",
        (
            f"{arch['arch']} with a {arch['encoder']} encoder (depth {arch['encoder_depth']}), "
            f"{len(card['classes'])} classes: {', '.join(card['classes'])}."
            if "encoder_depth" in arch
            else f"{arch['arch']} (instance segmentation) on a {arch['encoder']} FPN, "
            f"{len(card['classes'])} object categories: {', '.join(card['classes'])}."
        ),
        "",
        "## Input",
        "",
        f"- {card['input']['channels']} channel(s), 8-bit; trained on {card['input']['train_size']}-pixel crops; "
        f"any size at inference (padded to a multiple of {card['input']['pad_divisor']}, tiled when large).",
        f"- Normalisation: {card['input']['normalisation']['scale']}, mean {card['input']['normalisation']['mean']}, "
        f"std {card['input']['normalisation']['std']}.",
        "",
        f"## Test scores ({test['images']} images)",
        "",
        "| class | IoU | Dice |",
        "|---|---:|---:|",
    ]
    for name in card["classes"]:
        iou, dice = test["iou"]["per_class"].get(name), test["dice"]["per_class"].get(name)
        lines.append(f"| {name} | {_num(iou)} | {_num(dice)} |")
    lines += [
        f"| **macro** | **{_num(test['iou']['macro'])}** | **{_num(test['dice']['macro'])}** |",
        "",
        f"Pixel accuracy {_num(test['pixel_accuracy'])}. Reduction: {test['reduction']}",
        "",
        "## Data and training",
        "",
        f"- Data: {card['data']['images']} images {card['data']['splits']}, ingest output md5 "
        f"`{card['data']['ingest_md5']}`, source {card['data']['source']}.",
        f"- Training: {card['training']}.",
        f"- Params: seed {card['params']['seed']}; train {card['params']['train']}.",
        f"- Weights sha256 `{card['weights_sha256']}`; exports: {', '.join(card['exports']) or 'none'}.",
        "",
        "## Registration",
        "",
        f"- Registered {card['registration']['registered_at']} from commit `{card['registration']['source_commit']}`; "
        f"the tag `{card['model']}@{card['version']}` points at the commit that adds this card.",
        f"- Gate: {card['registration']['gate']['metric']} = {_num(card['registration']['gate']['value'])}; "
        + (
            f"promoted to {card['registration']['gate']['promoted_to']}."
            if card["registration"]["gate"]["promoted_to"]
            else "not promoted."
        )
        + (f" {card['registration']['gate']['reason']}." if card["registration"]["gate"].get("reason") else ""),
        _split_line(card),
        "",
        "## Fetch it",
        "",
        *[f"- {kind}: `{command}`" for kind, command in card["fetch"].items()],
        "",
    ]
    return "\n".join(lines)


def _split_line(card: dict) -> str:
    split, gate = card.get("test_split") or {}, card["registration"]["gate"]
    kind = (
        "frozen by the dataset's own split lists"
        if split.get("frozen")
        else "assigned by hashed id, grows with the data"
    )
    line = f"- Test split: {split.get('images')} images, sha256 `{str(split.get('sha256'))[:16]}` ({kind})"
    if gate.get("champion"):
        how = "re-scored on this split" if gate.get("rescored") else "scored on this same split"
        if gate.get("split_change") and not gate.get("rescored"):
            how = f"its score is from its own split ({gate['split_change']})"
        line += f"; compared with {gate['champion']} at {_num(gate.get('champion_score'))} ({how})"
    return line + "."


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"
