"""Atomic writes: a finished output appears whole, an interrupted one not at all."""

from __future__ import annotations

import numpy as np
import pytest

from segflow.io import atomic_dir, atomic_path, write_text


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_folder_is_replaced_whole(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
        (tmp / "stale.txt").write_text("old")
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]
    assert (out / "a.txt").read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_the_previous_folder_untouched(tmp_path):
    out = tmp_path / "model"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_failed_file_write_keeps_the_old_file_or_none(tmp_path):
    old, new = tmp_path / "metrics.json", tmp_path / "per_class.csv"
    write_text(old, "old")
    for target in (old, new):
        with pytest.raises(RuntimeError), atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert old.read_text() == "old"
    assert not new.exists()
    assert _leftovers(tmp_path) == []


def test_pictures_show_the_whole_split_and_no_class_in_black():
    from segflow import viz
    from segflow.layout import spread

    assert spread(100, 6) == [0, 20, 40, 59, 79, 99] and spread(3, 6) == [0, 1, 2] and spread(9, 1) == [0]
    colours = viz.palette(12)
    assert not (colours[:12] == 0).all(axis=1).any(), "no class is drawn black"
    assert len({tuple(c) for c in colours[:12]}) == 12
    legend = viz.grid([[np.zeros((8, 8, 3), np.uint8)]], ["sky", "road"], ["image"])
    assert (legend == viz.palette(2)[255]).all(axis=2).any(), "the legend shows the ignored pixels' grey"
