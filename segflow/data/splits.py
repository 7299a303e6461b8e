"""How ingest splits samples into train, val and test.

With ``layout: paired`` the split of a sample is a seeded hash of its key (its
``ingest.group`` match, or its own id), so adding images never moves an
existing one and related images share a split; ``ingest.split_ids`` fixes the
split of listed ids (and their groups), and ``ingest.test_ids`` freezes the test
split: exactly those ids, whatever is added later.
"""

from __future__ import annotations

import hashlib
import re

from segflow.data.checks import Problem
from segflow.errors import SegflowError

SPLITS = ("train", "val", "test")


def split_of(key: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The split of one sample (or group): a seeded hash of its key, cut at the fractions."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def assign_splits(
    keys: list[str], seed: int, val_fraction: float, test_fraction: float, fixed: dict[str, str] | None = None
) -> list[str]:
    """Split every key (a group or an id); fail when a split that was asked for comes out empty.

    Args:
        fixed: {key: split} for keys whose split is given (``ingest.split_ids``); the rest are hashed.

    Raises:
        SegflowError: a requested split (fraction > 0, or named in ``fixed``) got no samples.
    """
    fixed = fixed or {}
    splits = [fixed.get(k) or split_of(k, seed, val_fraction, test_fraction) for k in keys]
    wanted = {"train": 1.0, "val": val_fraction, "test": test_fraction}
    for name, fraction in wanted.items():
        if (fraction > 0 or name in fixed.values()) and name not in splits:
            raise SegflowError(
                f"split '{name}' got none of the {len(keys)} images "
                f"(ingest.val_fraction={val_fraction}, ingest.test_fraction={test_fraction}); "
                "add images or raise that fraction"
            )
    return splits


def freeze_test(keys: list[str], assigned: list[str], fixed: dict[str, str]) -> list[str]:
    """Splits with a frozen test set: only the keys fixed to test stay there; others the hash put in test
    go to train (train and val of everything else keep their hashed split, so growth moves nothing)."""
    return [
        "train" if split == "test" and fixed.get(key) != "test" else split
        for key, split in zip(keys, assigned, strict=True)
    ]


def group_of(sample_id: str, pattern: str | None, name: str) -> str:
    """The key that decides a sample's split: its ``ingest.group`` match, or its own id.

    Raises:
        Problem: the id does not match the pattern.
    """
    if pattern is None:
        return sample_id
    found = re.search(pattern, sample_id)
    if not found:
        raise Problem("group_mismatch", name, pattern=pattern)
    if "group" in found.re.groupindex:
        return found.group("group")
    return found.group(1) if found.re.groups else found.group(0)


def fixed_groups(rows: list[dict], split_ids: dict[str, list[str]], key: str = "ingest.split_ids") -> dict[str, str]:
    """{group: split} from ``ingest.split_ids`` (or the frozen ``ingest.test_ids``, as ``{"test": ids}`` with
    ``key``): a listed id takes its whole group along.

    Raises:
        SegflowError: a listed id is not in the data, or one group is listed for two splits.
    """
    group_of_id = {r["id"]: r["group"] for r in rows}
    fixed: dict[str, str] = {}
    for split, ids in split_ids.items():
        name = f"{key}.{split}" if key == "ingest.split_ids" else key
        for sample_id in ids:
            if sample_id not in group_of_id:
                raise SegflowError(
                    f"{name} lists '{sample_id}', which is not in the dataset (or was skipped); "
                    + (
                        "put the image back, or take it off the list (the frozen test set then changes)"
                        if key == "ingest.test_ids"
                        else "fix the id (ids are file names without extension)"
                    )
                )
            group = group_of_id[sample_id]
            if fixed.setdefault(group, split) != split:
                raise SegflowError(
                    f"{key} puts group '{group}' in both {fixed[group]} and {split} "
                    f"(through '{sample_id}'); one group belongs to one split"
                )
    return fixed
