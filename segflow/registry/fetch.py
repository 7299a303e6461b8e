"""The registry's read side: which versions exist, which one a spec names, and the model files for it.

Versions and stages are GTO git tags (``<name>@v1.2.3``, ``<name>#prod#N``).
"Which version is in a stage" is read with ``gto.api.show``, which orders
stage assignments by time (``gto.api.find_versions_in_stage`` and
``dvc artifacts get --stage`` can pick a stale one after a rollback or an
unassignment); files are then fetched by version, which is unambiguous.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from segflow.errors import SegflowError
from segflow.stage import STATE_DIR

log = logging.getLogger(__name__)

_SPEC = re.compile(r"^(?P<name>[^@#]+)(?:@(?P<version>v\d+\.\d+\.\d+)|#(?P<stage>[\w-]+))?$")


@dataclass(frozen=True)
class Version:
    """One registered version of a model."""

    name: str
    version: str
    commit: str
    created_at: str
    stages: tuple[str, ...]
    info: dict  # the JSON of its registration tag message

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def _gto_show(root: Path, name: str) -> tuple[list[dict], dict[str, str]]:
    from gto import api

    return api.show(str(root), name), api.show(str(root)).get(name, {}).get("stage", {})


def versions(root: Path, name: str) -> list[Version]:
    """Every registered version of ``name``, newest first, with the stages each one holds now."""
    from gto.exceptions import ArtifactNotFound

    try:
        rows, stages = _gto_show(root, name)
    except ArtifactNotFound:
        return []
    found = []
    for row in rows:
        try:
            info = json.loads(row.get("message") or "{}")
        except ValueError:
            info = {}
        held = tuple(sorted(stage for stage, version in stages.items() if version == row["version"]))
        created = row["created_at"].isoformat(timespec="seconds") if row.get("created_at") else ""
        found.append(Version(name, row["version"], row["commit_hexsha"], created, held, info))
    return found


def resolve(root: Path, spec: str) -> Version:
    """The version ``spec`` names: ``NAME`` (the latest), ``NAME@v1.2.3`` or ``NAME#stage``.

    Raises:
        SegflowError: a malformed spec, or nothing registered under it.
    """
    found = _SPEC.match(spec.strip())
    if not found:
        raise SegflowError(f"--model {spec}: write NAME, NAME@vX.Y.Z or NAME#stage (e.g. segflow-model#prod)")
    name, version, stage = found.group("name"), found.group("version"), found.group("stage")
    known = versions(root, name)
    if not known:
        raise SegflowError(f"--model {spec}: no version of {name} is registered in {root}; run segflow register")
    if version:
        match = [v for v in known if v.version == version]
        what = f"version {version}"
    elif stage:
        match = [v for v in known if stage in v.stages]
        what = f"a version in stage {stage}"
    else:
        match = known[:1]
        what = "a version"
    if not match:
        have = ", ".join(f"{v.version}{'[' + ','.join(v.stages) + ']' if v.stages else ''}" for v in known[:6])
        raise SegflowError(f"--model {spec}: {name} has no {what}; registered: {have}")
    return match[0]


def registered_card(root: Path, version: Version) -> dict:
    """The registry card committed with ``version`` (read from git, not from DVC's files); {} if there is none."""
    from segflow.registry.git import git

    text = git(root, "show", f"{version.commit}:registry/{version.name}/card.json", check=False)
    try:
        return json.loads(text) if text else {}
    except ValueError:
        return {}


def registered_weights(root: Path, version: Version) -> str | None:
    """The weights sha256 in the card committed with ``version``, or None for versions registered before
    cards carried it."""
    return registered_card(root, version).get("weights_sha256")


def _valid_export(folder: Path, name: str, expected: str) -> bool:
    from segflow.io import sha256_file

    with contextlib.suppress(OSError, ValueError, KeyError):
        entry = json.loads((folder / "model.json").read_text())["exports"][name]
        return entry["sha256"] == expected and sha256_file(folder / entry["file"]) == expected
    return False


def fetch_export(root: Path, version: Version, name: str = "onnx") -> Path:
    """The export folder (``${paths.export}`` of the version's commit) holding ``version``'s ``name`` export,
    checked against the sha256 the card committed with the tag names; fetched through DVC when the
    workspace holds another model's.

    Raises:
        SegflowError: the version was registered without that export, or DVC cannot provide the registered bytes.
    """

    entry = registered_card(root, version).get("exports", {}).get(name)
    if not entry or "folder" not in entry:
        raise SegflowError(
            f"{version.label} was registered without a {name} export; use --backend torch, or add {name} to "
            "export.formats, rerun the pipeline and register the model again"
        )
    workspace = root / entry["folder"]
    target = root / STATE_DIR / "models" / version.name / f"{version.version}-{name}"
    for folder in (workspace, target):
        if _valid_export(folder, name, entry["sha256"]):
            return folder

    def refused(folder: Path) -> str | None:
        if _valid_export(folder, name, entry["sha256"]):
            return None
        return (
            f"{version.label}: the {name} export DVC returned is not the one the card committed with the tag "
            f"names (sha256 {entry['sha256']}); refusing to load it (remove it from .dvc/cache and dvc pull "
            "from a remote you trust)"
        )

    return _fetch_checked(root, version, entry["folder"], target, refused, f"its {name} export")


def _local_export(root: Path, folder: Path, name: str) -> Path:
    """``folder`` when its card lists export ``name``, else the project's export folder when it was made
    from the same weights (``--model data/train/model --backend onnx``)."""
    from segflow.params import load_params
    from segflow.semantic.card import read_card

    card = read_card(folder)
    if name in card.exports or not (root / "params.yaml").is_file():
        return folder
    exports = root / load_params(root / "params.yaml").paths.export
    with contextlib.suppress(OSError, SegflowError):
        other = read_card(exports)
        if other.weights_sha256 == card.weights_sha256 and name in other.exports:
            return exports
    return folder


def _weights_sha(folder: Path, card: dict) -> str | None:
    from segflow.io import sha256_file

    path = folder / card.get("weights", "model.safetensors")
    return sha256_file(path) if path.is_file() else None


def fetch(root: Path, version: Version) -> Path:
    """The model folder of ``version``: the project's own when it holds exactly that model, else a copy
    fetched by version through DVC (from the local cache, or the DVC remote) into ``.segflow/models/``.

    Whatever DVC hands back is checked against git: the weights' sha256 must be the one in the card committed
    with the version's tag, so bytes swapped in DVC's cache or on a remote are refused, not loaded.

    Raises:
        SegflowError: DVC has the files neither in its cache nor on a remote, or they are not the registered ones.
    """
    import dvc.api
    from dvc.exceptions import DvcException

    try:
        artifact = dvc.api.artifacts_show(version.name, version=version.version, repo=str(root))
        card = json.loads(dvc.api.read(f"{artifact['path']}/model.json", repo=str(root), rev=version.commit))
    except DvcException as error:
        raise SegflowError(
            f"{version.label}: cannot read it through DVC ({error}); dvc pull, or check the remote"
        ) from None
    expected = registered_weights(root, version)
    workspace = root / artifact["path"]
    target = root / STATE_DIR / "models" / version.name / version.version
    for folder in (workspace, target):
        with contextlib.suppress(OSError, ValueError):
            if json.loads((folder / "model.json").read_text()) != card:
                continue
            if expected is None or _weights_sha(folder, card) == expected:
                return folder
            if folder == workspace:
                log.warning(
                    "%s holds %s's card but other weights; using DVC's copy (dvc checkout %s restores the workspace)",
                    artifact["path"],
                    version.label,
                    artifact["path"],
                )

    def refused(folder: Path) -> str | None:
        got = _weights_sha(folder, card)
        if expected is None or got == expected:
            return None
        return (
            f"{version.label}: the weights DVC returned have sha256 {got} but the card committed with the tag "
            f"names {expected}; refusing to load them: DVC's cache or remote holds other bytes for this "
            "version (remove them from .dvc/cache and dvc pull from a remote you trust)"
        )

    return _fetch_checked(root, version, artifact["path"], target, refused, "its files")


def _fetch_checked(root: Path, version: Version, path: str, target: Path, refused, what: str) -> Path:
    """Fetch ``path`` at the version's commit through DVC (cache, then remote) into ``target``, via a scratch
    folder beside it, keeping it only if ``refused(folder)`` has no objection (its one-line reason).

    Raises:
        SegflowError: DVC has the files neither in its cache nor on a remote, or ``refused`` objects.
    """
    import dvc.api
    from dvc.exceptions import DvcException

    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{version.version}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        dvc.api.DVCFileSystem(str(root), rev=version.commit).get(path, str(scratch / "got"), recursive=True)
        reason = refused(scratch / "got")
        if reason:
            raise SegflowError(reason)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(scratch / "got", target)
    except (DvcException, OSError) as error:
        raise SegflowError(
            f"{version.label}: {what}: in neither DVC's cache nor a DVC remote ({error}); "
            "run dvc push where it was made, then dvc pull here"
        ) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def load_model(
    spec: str = "segflow-model#prod", root: Path | str = ".", backend: str = "torch", device: str | None = None
):
    """A registered model, ready to predict: ``load_model("segflow-model#prod").predict(image)``.

    Args:
        spec: ``NAME``, ``NAME@vX.Y.Z`` or ``NAME#stage``; or the path of a model folder.
        root: the segflow project holding the registry (its params.yaml gives the tile settings).
        backend: ``torch`` (safetensors weights) or ``onnx`` (the model's ONNX export, onnxruntime).
        device: for torch: ``cpu``, ``cuda``, ... (default: CUDA when there is one).

    Returns:
        A :class:`segflow.semantic.infer.Predictor`; ``.predict(image)`` maps (H, W[, C]) uint8 to (H, W)
        uint8 class ids.
    """
    from segflow.params import PredictParams, load_params
    from segflow.semantic import infer, store
    from segflow.semantic.card import read_card

    root = Path(root).resolve()
    if backend not in ("torch", "onnx"):
        raise SegflowError(f"--backend {backend}: choose torch or onnx")
    settings = load_params(root / "params.yaml").predict if (root / "params.yaml").is_file() else PredictParams()
    if backend == "onnx":
        from segflow.instance.card import is_instance_card

        if Path(spec).is_dir() and is_instance_card(spec):
            raise SegflowError(f"{spec}: an instance model (Mask R-CNN) has no ONNX export; use --backend torch")
        if Path(spec).is_dir():
            folder = _local_export(root, Path(spec), "onnx")
        else:
            folder = fetch_export(root, resolve(root, spec), "onnx")
        card = read_card(folder)
        forward = infer.onnx_forward(store.verify(folder, card, "onnx"))
    else:
        folder = Path(spec) if Path(spec).is_dir() else fetch(root, resolve(root, spec))
        from segflow.instance.card import is_instance_card

        if is_instance_card(folder):
            return _instance_predictor(root, folder)
        model, card = store.load(folder)
        forward = infer.torch_forward(model, device)
    tile = settings.tile_size - settings.tile_size % card.pad_divisor
    return infer.Predictor(forward, card, max(tile, card.pad_divisor), settings.overlap, settings.batch_size)


def _instance_predictor(root: Path, folder: Path):
    """An instance model's predictor, with the project's instance inference settings (or their defaults)."""
    from segflow.instance.evaluate import predictor_for
    from segflow.params import InstanceParams, load_params

    params = load_params(root / "params.yaml") if (root / "params.yaml").is_file() else None
    return predictor_for(folder, params if isinstance(params, InstanceParams) else InstanceParams())
