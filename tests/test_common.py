"""Atomic writes: a finished output appears whole, an interrupted one not at all."""

from __future__ import annotations

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
