"""``segflow compare``: architectures, encoders and losses side by side, as DVC experiments.

One experiment per combination is queued with ``dvc exp run --queue -S ...``
(named ``<dataset>-<arch>-<encoder>-<loss>``), the queue is run with
``dvc exp run --run-all`` (``--jobs`` workers; one keeps the timings fair),
and the results are read back from ``dvc exp show --json`` into
``docs/compare/<dataset>.md`` and ``.csv``: test IoU and Dice (macro and per
class), parameters, multiply-accumulates at the training size, training time
and inference images/s, with the command that reproduces the table. Our code
only queues and tabulates; DVC runs, caches and keeps the experiments, so
``dvc exp show`` lists the same runs and ``dvc exp apply NAME`` brings one into
the workspace.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import logging
import re
import subprocess
from pathlib import Path

import yaml

from segflow.errors import SegflowError
from segflow.layout import LIVE_DIR, SCORES, SPEED
from segflow.ops.env import machine, stage_env
from segflow.params import load_params, parse_params

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Combination:
    """One experiment: its name and the params it sets (``-S key=value``)."""

    name: str
    arch: str
    encoder: str
    loss: str
    sets: tuple[tuple[str, str], ...]


def dataset_name(root: Path) -> str:
    """``synthetic`` for the demo scenes, else the dataset folder's (or archive's) name."""
    ingest = load_params(root / "params.yaml").ingest
    if ingest.source == "synthetic":
        return "synthetic"
    name = Path(ingest.path).name
    for suffix in (".tar.gz", ".tgz", ".tar", ".zip"):
        name = name.removesuffix(suffix)
    return name


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.")


def plan(
    root: Path, archs: list[str], encoders: list[str], losses: list[str], sets: list[str], dataset: str
) -> list[Combination]:
    """The experiments to queue, each checked (params valid, model builds) before any is queued.

    FCN and SegNet keep their own backbones (resnet50, vgg16_bn) where an encoder of theirs is not listed;
    decoder_channels stays only for decoders that take one width per stage.

    Raises:
        SegflowError: a combination whose params or model are invalid, naming it.
    """
    from segflow.semantic import factory
    from segflow.semantic.archs import ENCODERS

    data = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
    base = load_params(root / "params.yaml")
    extra = shared_sets(sets)
    if base.task == "instance":
        return _instance_plan(data, archs, encoders, extra, dataset)
    ingest_path = Path(base.ingest.path)
    absolute = (root / ingest_path).resolve()
    if base.ingest.source == "folder" and not absolute.is_relative_to(root.resolve()):
        # Queued experiments run in a copy of the repository under .dvc/tmp: a path that climbs out of the
        # project would point elsewhere from there.
        extra.append(("ingest.path", str(absolute)))
    combos, seen = [], set()
    for arch, encoder, loss in itertools.product(archs, encoders, losses):
        own = ENCODERS.get(arch)
        if own and encoder not in own:
            encoder = own[0]
        if (arch, encoder, loss) in seen:
            continue
        seen.add((arch, encoder, loss))
        changes = [("train.arch", arch), ("train.encoder", encoder), ("train.loss", loss)]
        if base.train.decoder_channels is not None and not factory.takes_stage_widths(arch):
            changes.append(("train.decoder_channels", "null"))
        changes += extra
        name = _slug(f"{dataset}-{arch}-{encoder}-{loss}")
        merged = _with_sets(data, changes)
        try:
            params = parse_params(merged, f"{name} (params.yaml with {', '.join(f'{k}={v}' for k, v in changes)})")
            factory.build(params.train, len(params.classes), in_channels=3)
        except SegflowError as error:
            raise SegflowError(f"segflow compare: {arch} / {encoder} / {loss}: {error}") from None
        combos.append(Combination(name, arch, encoder, loss, tuple(changes)))
    if not combos:
        raise SegflowError("segflow compare: nothing to compare; give --archs (and --encoders / --losses)")
    return combos


def _instance_plan(data: dict, archs: list[str], encoders: list[str], extra: list, dataset: str) -> list[Combination]:
    """task: instance: one experiment per Mask R-CNN backbone (the loss is torchvision's: not a choice)."""
    if any(arch != "MaskRCNN" for arch in archs):
        raise SegflowError(f"segflow compare: task: instance trains MaskRCNN only (got --archs {','.join(archs)})")
    combos = []
    for encoder in dict.fromkeys(encoders):
        changes = [("train.encoder", encoder), *extra]
        name = _slug(f"{dataset}-MaskRCNN-{encoder}")
        try:
            parse_params(_with_sets(data, changes), f"{name} (params.yaml with train.encoder={encoder})")
        except SegflowError as error:
            raise SegflowError(f"segflow compare: MaskRCNN / {encoder}: {error}") from None
        combos.append(Combination(name, "MaskRCNN", encoder, "-", tuple(changes)))
    if not combos:
        raise SegflowError("segflow compare: nothing to compare; give --encoders")
    return combos


def _with_sets(data: dict, sets) -> dict:
    """A copy of the params mapping ``data`` with each ``(dotted key, YAML value)`` set, as ``dvc exp run -S``."""
    merged = json.loads(json.dumps(data, default=str))
    for key, value in sets:
        *parents, last = key.split(".")
        node = merged
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    return merged


def shared_sets(sets: list[str]) -> list[tuple[str, str]]:
    """``--set key=value`` items as pairs.

    Raises:
        SegflowError: an item without ``=``.
    """
    pairs = []
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SegflowError(f"--set {item}: give key=value, e.g. --set train.epochs=10")
        pairs.append((key.strip(), value.strip()))
    return pairs


def _dvc(root: Path, *args: str, check: bool = True, capture: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["dvc", *args], cwd=root, env=stage_env(), text=True, capture_output=capture)
    if check and proc.returncode != 0:
        detail = " ".join(((proc.stderr or "") + (proc.stdout or "")).split())[-500:]
        raise SegflowError(f"dvc {' '.join(args[:3])} failed ({detail})")
    return proc


def queue(root: Path, combos: list[Combination], force: bool = False) -> None:
    """Queue one DVC experiment per combination (an earlier experiment of the same name is replaced).

    Args:
        force: rerun every stage even where DVC's run cache holds the result (to measure timings again).
    """
    names = [c.name for c in combos]
    _dvc(root, "exp", "remove", *names, check=False)  # a rerun replaces the earlier results
    _dvc(root, "queue", "remove", *names, check=False)
    for combo in combos:
        args = [arg for key, value in combo.sets for arg in ("-S", f"{key}={value}")]
        _dvc(root, "exp", "run", "--queue", *(["--force"] if force else []), "--name", combo.name, *args)
        log.info("queued %s", combo.name)


def run_queue(root: Path, jobs: int) -> None:
    """Run every queued experiment (``dvc exp run --run-all``), following their logs."""
    if jobs > 1:
        log.warning("%d experiments at a time share this machine: their timings are not comparable", jobs)
    _dvc(root, "exp", "run", "--run-all", "--jobs", str(jobs), capture=False, check=False)


def _flatten(node: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _json_at(root: Path, rev: str | None, path: Path) -> dict:
    """A JSON output of an experiment's commit ``rev`` (through DVC: its cache holds it), flattened; {} when
    it is not there."""
    import dvc.api
    from dvc.exceptions import DvcException

    if not rev:
        return {}
    try:
        return _flatten(json.loads(dvc.api.read(path.as_posix(), repo=str(root), rev=rev)))
    except (DvcException, OSError, ValueError):
        return {}


def collect(root: Path, combos: list[Combination]) -> list[dict]:
    """One row per combination from ``dvc exp show --json`` (newest experiment of that name)."""
    shown = json.loads(_dvc(root, "exp", "show", "--json", "--all-commits").stdout or "[]")
    found: dict[str, dict] = {}
    for baseline in shown:
        for experiment in baseline.get("experiments") or []:
            rev = (experiment.get("revs") or [{}])[0]
            name, data = rev.get("name") or experiment.get("name"), rev.get("data") or {}
            if not name or rev.get("error") or not data.get("metrics"):
                continue
            if name not in found or data.get("timestamp", "") > found[name]["timestamp"]:
                metrics = {file: _flatten(content.get("data") or {}) for file, content in data["metrics"].items()}
                found[name] = {"timestamp": data.get("timestamp", ""), "rev": rev.get("rev"), "metrics": metrics}
    rows = []
    for combo in combos:
        row = {"experiment": combo.name, "arch": combo.arch, "encoder": combo.encoder, "loss": combo.loss}
        result = found.get(combo.name)
        if result is None:
            row["status"] = "not finished (dvc queue status; dvc queue logs NAME)"
            rows.append(row)
            continue
        # Per class, speed and the training summary are git-tracked files of the experiment's commit.
        paths = load_params(root / "params.yaml").paths
        scores = _json_at(root, result["rev"], paths.evaluate / SCORES) or next(iter(result["metrics"].values()), {})
        speed = _json_at(root, result["rev"], paths.evaluate / SPEED)
        live = _json_at(root, result["rev"], paths.train / LIVE_DIR / "metrics.json")
        row.update(
            status="done",
            rev=(result["rev"] or "")[:7],
            iou_macro=scores.get("iou.macro"),
            dice_macro=scores.get("dice.macro"),
            **{k.replace("iou.per_class.", "iou_"): v for k, v in scores.items() if k.startswith("iou.per_class.")},
            **{k.replace("dice.per_class.", "dice_"): v for k, v in scores.items() if k.startswith("dice.per_class.")},
            parameters=speed.get("model.parameters"),
            gmacs=speed.get("model.gmacs"),
            macs_size=speed.get("model.macs_size"),
            train_s=live.get("perf.fit_s"),
            epochs=live.get("epoch"),  # epochs trained (DVCLive's summary as the train stage writes it)
            infer_images_per_s=speed.get("inference.images_per_s"),
            infer_device=speed.get("inference.device"),
        )
        if "segm.map" in scores:  # task: instance
            row.update(
                segm_map=scores.get("segm.map"),
                segm_map_50=scores.get("segm.map_50"),
                bbox_map=scores.get("bbox.map"),
                count_mae=scores.get("counts.mean_abs_count_error"),
            )
        rows.append(row)
    return rows


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def write_table(
    root: Path, dataset: str, rows: list[dict], command: str, out: Path, sets: list[str] = ()
) -> tuple[Path, Path]:
    """``<out>/<dataset>.csv`` (every figure) and ``.md`` (the table, settings and command); atomic.

    Args:
        sets: the ``--set key=value`` every experiment ran with (the settings shown include them).
    """
    import pandas as pd

    from segflow.io import write_text

    data = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
    params = parse_params(_with_sets(data, shared_sets(list(sets))))
    out = root / out
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(rows)
    instance = params.task == "instance"
    key = "segm_map" if instance else "iou_macro"
    if key in frame:
        frame = frame.sort_values(key, ascending=False, na_position="last")
    csv_path, md_path = out / f"{dataset}.csv", out / f"{dataset}.md"
    write_text(csv_path, frame.to_csv(index=False))
    if instance:
        write_text(md_path, _instance_table(frame, params, dataset, command, root))
        return md_path, csv_path
    classes = params.classes
    head = ["experiment", "IoU macro", "Dice macro", *(f"IoU {c}" for c in classes)]
    head += ["params (M)", "GMACs", "train (s)", "infer (img/s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in frame.to_dict("records"):
        if row.get("status") != "done":
            lines.append(f"| {row['experiment']} | {row.get('status')} |" + " |" * (len(head) - 2))
            continue
        cells = [row["experiment"], _fmt(row["iou_macro"]), _fmt(row["dice_macro"])]
        cells += [_fmt(row.get(f"iou_{c}")) for c in classes]
        cells += [
            _fmt(row["parameters"] / 1e6, 2) if row.get("parameters") else "",
            _fmt(row.get("gmacs"), 2),
            _fmt(row.get("train_s"), 0),
            _fmt(row.get("infer_images_per_s"), 1),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    t = params.train
    text = "\n".join(
        [
            f"# Comparison on {dataset}",
            "",
            f"Written by `segflow compare` on {datetime.date.today().isoformat()} from commit "
            f"`{head_rev.stdout.strip() or '?'}`; every row is a DVC experiment (`dvc exp show`, "
            "`dvc exp apply NAME`).",
            "",
            "```",
            command,
            "```",
            "",
            f"- Data: {dataset} (ingest.source {params.ingest.source}), classes {', '.join(classes)}; the test "
            "split scored at full size (IoU/Dice from pixel counts summed over the split; macro = mean over classes).",
            f"- Shared settings (params.yaml with the --set values): epochs {t.epochs}, batch {t.batch_size}, "
            f"crop {params.augment.crop_size}, "
            f"augmentation preset {params.augment.preset}, optimiser {t.optimizer} lr {t.lr} ({t.schedule}), "
            f"encoder depth {t.encoder_depth}, precision {t.precision}, seed {params.seed}, random init.",
            f"- Machine: {machine()}.",
            "- params (M): trainable parameters, millions. GMACs: multiply-accumulates of one forward pass on one "
            f"{params.augment.crop_size}x{params.augment.crop_size} image (torch.utils.flop_counter: convolutions "
            "and matrix products). train (s): wall time of the training loop (validation included, start-up "
            "not). infer (img/s): test images through the shipped inference path (`segflow predict`'s), "
            "first image left out as warm-up.",
            "- FCN and SegNet use their own backbones (torchvision's resnet50 for FCN, VGG16-BN for SegNet).",
            "",
            *lines,
            "",
        ]
    )
    write_text(md_path, text)
    return md_path, csv_path


def _instance_table(frame, params, dataset: str, command: str, root: Path) -> str:
    """The markdown of an instance comparison: COCO mask AP, counts, pixel IoU, size and time per backbone."""
    head = ["experiment", "mask AP", "AP50", "box AP", "count error", "IoU macro", "params (M)", "train (s)"]
    head += ["infer (img/s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in frame.to_dict("records"):
        if row.get("status") != "done":
            lines.append(f"| {row['experiment']} | {row.get('status')} |" + " |" * (len(head) - 2))
            continue
        cells = [row["experiment"], *(_fmt(row.get(k)) for k in ("segm_map", "segm_map_50", "bbox_map"))]
        cells += [_fmt(row.get("count_mae"), 2), _fmt(row.get("iou_macro"))]
        cells += [_fmt(row["parameters"] / 1e6, 2) if row.get("parameters") else ""]
        cells += [_fmt(row.get("train_s"), 0), _fmt(row.get("infer_images_per_s"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    t = params.train
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True)
    return "\n".join(
        [
            f"# Comparison on {dataset} (instance segmentation)",
            "",
            f"Written by `segflow compare` on {datetime.date.today().isoformat()} from commit "
            f"`{head_rev.stdout.strip() or '?'}`; every row is a DVC experiment (`dvc exp show`).",
            "",
            "```",
            command,
            "```",
            "",
            f"- Data: {dataset}, categories {', '.join(params.classes)}; COCO mask and box AP on the test split "
            f"(maxDets {params.predict.max_detections}); count error: mean absolute difference of objects per image "
            f"(predictions scoring >= {params.evaluate.count_threshold}); IoU macro: pixels of the instance masks.",
            f"- Shared settings: Mask R-CNN, FPN width {t.width}, epochs {t.epochs}, batch {t.batch_size}, crop "
            f"{params.augment.crop_size}, preset {params.augment.preset}, {t.optimizer} lr {t.lr}, seed {params.seed}, "
            "random init.",
            f"- Machine: {machine()}.",
            "",
            *lines,
            "",
        ]
    )


def compare(
    root: Path,
    archs: list[str],
    encoders: list[str],
    losses: list[str],
    sets: list[str],
    dataset: str | None = None,
    jobs: int = 1,
    run: bool = True,
    queue_experiments: bool = True,
    out: Path = Path("docs/compare"),
    command: str = "",
    force: bool = False,
) -> tuple[Path, Path, list[dict]]:
    """Plan, queue, run and tabulate; ``run=False`` only queues, ``queue_experiments=False`` only tabulates."""
    dataset = dataset or dataset_name(root)
    combos = plan(root, archs, encoders, losses, sets, dataset)
    if queue_experiments:
        queue(root, combos, force)
    if run and queue_experiments:
        run_queue(root, jobs)
    rows = collect(root, combos)
    md, csv = write_table(root, dataset, rows, command, out, sets)
    return md, csv, rows
