"""ingest: deterministic demo data, a stable split, a truthful manifest, atomic output."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from segflow.data import ingest, synthetic
from segflow.data.splits import assign_splits
from segflow.errors import SegflowError
from segflow.io import read_image, read_mask
from segflow.layout import read_manifest


def _scenes(seed, n, size=48, classes=4):
    return list(synthetic.generate(seed, n, classes, size, 2, 5, 0.05))


def test_synthetic_is_seeded_and_independent_of_count():
    first, again, longer = _scenes(1, 4), _scenes(1, 4), _scenes(1, 9)
    for (i1, im1, m1), (i2, im2, m2), (i3, im3, m3) in zip(first, again, longer, strict=False):
        assert i1 == i2 == i3
        assert np.array_equal(im1, im2) and np.array_equal(m1, m2)
        assert np.array_equal(im1, im3) and np.array_equal(m1, m3)  # image i depends on (seed, i) only
    other = _scenes(2, 4)
    assert not np.array_equal(first[0][1], other[0][1])


def test_synthetic_scenes_are_multiclass_varied_and_imbalanced():
    scenes = _scenes(0, 60, size=64)
    counts = sum(np.bincount(m.ravel(), minlength=4) for _, _, m in scenes)
    assert all(counts > 0), "every class appears"
    assert counts[0] > counts[1:].sum(), "background dominates, as in real data"
    assert counts[1] > 1.5 * counts[3], "the last class is rarer (imbalance on purpose)"
    image, mask = scenes[0][1], scenes[0][2]
    assert image.dtype == np.uint8 and image.shape == (64, 64, 3) and mask.shape == (64, 64)
    # Objects are not flat colour: texture and noise give every class a spread of values.
    for cls in range(1, 4):
        pixels = np.concatenate([im[m == cls] for _, im, m in scenes])
        assert pixels.std() > 10


def test_synthetic_rejects_more_classes_than_kinds():
    with pytest.raises(ValueError, match="object classes"):
        next(synthetic.generate(0, 1, synthetic.MAX_OBJECT_CLASSES + 2, 32, 1, 2, 0.0))


def test_split_is_deterministic_and_stable_when_data_grows():
    ids = [f"img_{i:04d}" for i in range(400)]
    splits = assign_splits(ids, 7, 0.15, 0.15)
    assert splits == assign_splits(ids, 7, 0.15, 0.15)
    grown = assign_splits([*ids, *(f"new_{i}" for i in range(100))], 7, 0.15, 0.15)
    assert grown[:400] == splits, "adding images never moves an existing one"
    shares = pd.Series(splits).value_counts(normalize=True)
    assert 0.10 < shares["test"] < 0.20 and 0.10 < shares["val"] < 0.20
    assert assign_splits(ids, 8, 0.15, 0.15) != splits


def test_empty_split_is_a_clear_error():
    with pytest.raises(SegflowError, match=r"split 'test' got none of the 2 images.*ingest.test_fraction"):
        assign_splits(["a", "b"], 0, 0.0, 0.01)


def test_run_writes_layout_and_a_truthful_manifest(tiny_params, tiny_paths):
    manifest = ingest.run(tiny_params, tiny_paths)
    on_disk = read_manifest(tiny_paths.ingest)
    pd.testing.assert_frame_equal(manifest.reset_index(drop=True), on_disk, check_dtype=False)
    assert list(on_disk.columns[:2]) == ["id", "split"]
    assert set(on_disk["split"]) == {"train", "val", "test"}
    for row in on_disk.itertuples():
        image, mask = read_image(tiny_paths.ingest / row.image), read_mask(tiny_paths.ingest / row.mask)
        assert image.shape[:2] == mask.shape == (row.height, row.width)
        counts = np.bincount(mask.ravel(), minlength=4)
        assert [row.px_background, row.px_disk, row.px_box, row.px_triangle] == counts.tolist()


def test_rerun_is_byte_identical(tiny_params, tiny_paths, tmp_path):
    ingest.run(tiny_params, tiny_paths)
    other = tiny_params.paths.under(tmp_path / "again")
    ingest.run(tiny_params, other)
    for path in sorted(tiny_paths.ingest.rglob("*.*")):
        twin = other.ingest / path.relative_to(tiny_paths.ingest)
        assert path.read_bytes() == twin.read_bytes(), path.name


def test_crash_leaves_previous_output_intact(tiny_params, tiny_paths, monkeypatch):
    ingest.run(tiny_params, tiny_paths)
    before = {p.relative_to(tiny_paths.ingest): p.read_bytes() for p in tiny_paths.ingest.rglob("*") if p.is_file()}

    real, calls = ingest._ingest_one, []

    def broken(item, job):
        calls.append(item)
        if len(calls) > 3:
            raise RuntimeError("disk full")
        return real(item, job)

    monkeypatch.setattr(ingest, "_ingest_one", broken)
    # Another seed: the interrupted run's first images differ from the ones on disk.
    with pytest.raises(RuntimeError, match="disk full"):
        ingest.run(tiny_params.model_copy(update={"seed": tiny_params.seed + 1}), tiny_paths)
    after = {p.relative_to(tiny_paths.ingest): p.read_bytes() for p in tiny_paths.ingest.rglob("*") if p.is_file()}
    assert after == before
    assert not [p for p in tiny_paths.ingest.parent.iterdir() if ".tmp-" in p.name], "no temporary left behind"


def test_a_frozen_test_set_stays_exactly_itself_as_the_data_grows(tmp_path):
    """`segflow freeze-test` writes today's test ids into params.yaml; after the dataset doubles, the test split
    is exactly those images, the old train/val images keep their split, and the new ones train or validate."""
    import yaml

    from bench._util import merge
    from segflow.config import freeze_test
    from segflow.params import load_params
    from segflow.registry.rescore import test_split
    from tests.conftest import TINY

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    params = load_params(tmp_path / "params.yaml")
    before = ingest.run(params, params.paths.under(tmp_path))
    assert not test_split(tmp_path, params)["frozen"]
    count, _ = freeze_test(tmp_path)
    frozen = sorted(before.loc[before["split"] == "test", "id"])
    assert count == len(frozen) > 0
    assert freeze_test(tmp_path) == (0, f"ingest.test_ids already holds these {count} test ids")

    grown = merge(yaml.safe_load((tmp_path / "params.yaml").read_text()), {"ingest": {"synthetic": {"num_images": 48}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(grown))
    params = load_params(tmp_path / "params.yaml")
    after = ingest.run(params, params.paths.under(tmp_path))
    assert len(after) == 48
    assert sorted(after.loc[after["split"] == "test", "id"]) == frozen
    old = before.set_index("id")["split"]
    assert (after.set_index("id").loc[old.index, "split"] == old).all(), "no earlier image moved"
    hashed = assign_splits(list(after["id"]), params.seed, 0.2, 0.2)
    new_in_test = [i for i, s in zip(after["id"], hashed, strict=True) if s == "test" and i not in frozen]
    assert new_in_test, "the hash would have sent some new images to test"
    assert (after.set_index("id").loc[new_in_test, "split"] == "train").all()
    assert test_split(tmp_path, params)["frozen"]

    shrunk = merge(grown, {"ingest": {"test_ids": [*frozen, "scene_9999"]}})
    with pytest.raises(SegflowError, match=r"ingest.test_ids lists 'scene_9999', which is not in the dataset"):
        ingest.run(load_params_from(tmp_path, shrunk), params.paths.under(tmp_path))


def load_params_from(folder, data):
    import yaml

    from segflow.params import load_params

    (folder / "params.yaml").write_text(yaml.safe_dump(data))
    return load_params(folder / "params.yaml")
