"""``segflow params FILE``: lay a ready configuration (e.g. ``configs/isbi2012.yaml``) over params.yaml.

The file holds only the keys it changes. They are merged into params.yaml key
by key (nested sections merged, lists and values replaced), the comments and
order of params.yaml are kept, and the result is validated as a whole before
params.yaml is replaced (atomically), so a bad configuration never leaves a
half-applied file behind.
"""

from __future__ import annotations

import io
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from segflow.errors import SegflowError
from segflow.io import atomic_path
from segflow.params import PARAMS_FILE, parse_params, read_yaml


def _flow(value: object) -> object:
    """A value as params.yaml writes its short mappings and lists: on one line, ``{a: 1}``, ``[x, y]``."""
    if isinstance(value, dict):
        value = CommentedMap((k, _flow(v)) for k, v in value.items())
    elif isinstance(value, list):
        value = CommentedSeq(_flow(v) for v in value)
    else:
        return value
    value.fa.set_flow_style()
    return value


def _merge(target: CommentedMap, override: dict, prefix: str, changed: list[str]) -> None:
    for key, value in override.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value, f"{name}.", changed)
        elif target.get(key, object()) != value:
            target[key] = _flow(value)
            changed.append(name)


def _null(representer, _value) -> object:
    return representer.represent_scalar("tag:yaml.org,2002:null", "null")


def apply(root: Path, config: Path) -> list[str]:
    """Merge ``config`` into ``root``/params.yaml; return the dotted keys whose value changed.

    Raises:
        SegflowError: the file is missing or not a mapping, or the merged params are invalid
            (params.yaml is then left as it was).
    """
    try:
        override = read_yaml(config.read_text(encoding="utf-8"), config)
    except FileNotFoundError:
        raise SegflowError(f"{config}: not found; give a YAML file of params to apply (see configs/)") from None
    except (UnicodeDecodeError, IsADirectoryError):
        raise SegflowError(f"{config}: not a YAML text file; give a file of params like configs/*.yaml") from None
    if not isinstance(override, dict):
        raise SegflowError(f"{config}: expected a mapping of params sections (like params.yaml), got {override!r}")
    return set_params(root, override, f"after applying {config}")


def _drop_foreign(document: CommentedMap) -> list[str]:
    """After a switch of ``task``: remove the keys the new task's sections do not have, or have with another
    meaning (a value the new task refuses falls back to its default); returns them as ``-section.key``."""
    from segflow.params import params_class

    model = params_class(dict(document))
    removed = []
    for section, values in document.items():
        field = model.model_fields.get(section)
        keys = getattr(field.annotation, "model_fields", None) if field is not None else None
        if not isinstance(values, dict) or keys is None:
            continue
        for key in [k for k in values if k not in keys or not _valid(field.annotation, k, values[k])]:
            del values[key]  # a key of both families whose value means nothing here (monitor: val/iou_macro)
            removed.append(f"-{section}.{key}")
    return removed


def _valid(section: type, key: str, value: object) -> bool:
    """Whether ``key: value`` alone is a valid value of the params section ``section``."""
    from pydantic import ValidationError

    try:
        section.model_validate({key: value})
    except ValidationError as error:
        return not any(item["loc"][:1] == (key,) for item in error.errors())
    return True


def set_params(root: Path, override: dict, why: str) -> list[str]:
    """Merge ``override`` into ``root``/params.yaml, keeping its comments and order; validated as a whole
    before the file is replaced (atomically). Returns the dotted keys whose value changed; when ``task``
    changes, the keys the other task family has and this one lacks are removed (listed as ``-section.key``).

    Raises:
        SegflowError: the merged params are invalid (params.yaml is then left as it was).
    """
    params_file = root / PARAMS_FILE
    editor = YAML()  # round-trip: comments and key order survive
    editor.preserve_quotes = True
    editor.width = 4096  # no wrapping: one key, one line
    editor.representer.add_representer(type(None), _null)
    document = editor.load(params_file.read_text(encoding="utf-8"))
    changed: list[str] = []
    task_before = document.get("task", "semantic")
    _merge(document, override, "", changed)
    if document.get("task", "semantic") != task_before:
        changed += _drop_foreign(document)
    buffer = io.StringIO()
    editor.dump(document, buffer)
    text = buffer.getvalue()
    parse_params(read_yaml(text, params_file), source=f"{params_file} ({why})")
    with atomic_path(params_file) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return changed


def freeze_test(root: Path) -> tuple[int, str | None]:
    """``segflow freeze-test``: write today's test ids into params.yaml ``ingest.test_ids``.

    From then on exactly those images are the test split, whatever is added to the dataset, so the
    gate and ``dvc metrics diff`` compare scores on the same images (README, Models).

    Returns:
        (test ids frozen, or 0, and why nothing was done: the split is frozen already).

    Raises:
        SegflowError: ingest has not run yet (there is no split to freeze).
    """
    from segflow.layout import read_manifest, split_rows
    from segflow.params import load_params

    params = load_params(root / PARAMS_FILE)
    cfg = params.ingest
    if cfg.source == "folder" and (cfg.layout == "split_folders" or cfg.split_lists is not None):
        return 0, "the dataset's own split lists (split_folders / split_lists) fix the test split already"
    try:
        rows = split_rows(read_manifest(root / params.paths.ingest), "test")
    except (OSError, SegflowError):
        raise SegflowError(
            f"{params.paths.ingest}: no ingested data to freeze the test split of; run `segflow run` (or "
            "`dvc repro ingest`) first"
        ) from None
    ids = sorted(rows["id"])
    if cfg.test_ids is not None and sorted(cfg.test_ids) == ids:
        return 0, f"ingest.test_ids already holds these {len(ids)} test ids"
    set_params(root, {"ingest": {"test_ids": ids}}, "freezing the test split")
    return len(ids), None
