"""Integration: a user's dataset under DVC drives the pipeline: new data reruns it, no change reruns nothing."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from bench._util import fresh_project, merge
from tests.conftest import TINY
from tests.datasets import paired
from tests.test_pipeline import STAGES, _dvc, _ran, _segflow

FOLDER = merge(
    TINY,
    {
        "classes": ["background", "blob"],
        "ingest": {"source": "folder", "path": "data/raw/cells", "workers": 2, "val_fraction": 0.25},
        "augment": {"normalize": {"mean": [0.2], "std": [0.3]}},
    },
)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    project = fresh_project(tmp_path_factory.mktemp("byod") / "project", FOLDER)
    paired(project / "data/raw/cells", n=16)
    _dvc(project, "add", "data/raw/cells")
    return project


def _manifest(project) -> pd.DataFrame:
    return pd.read_csv(project / "data/ingest/manifest.csv")


def test_tracked_dataset_runs_the_whole_pipeline_then_nothing(project):
    first = _dvc(project, "repro")
    assert _ran(first.stdout) == STAGES, first.stdout
    manifest = _manifest(project)
    assert len(manifest) == 16 and set(manifest["channels"]) == {1}
    assert (project / "data/ingest/report.md").is_file()
    assert _ran(_dvc(project, "repro").stdout) == []


def test_adding_an_image_reruns_ingest_and_every_later_stage(project, prefect_api):
    """Through `segflow run`, as a scheduled retrain meets new data: the run records the dataset's new version
    in its .dvc file as `dvc repro` would, so `dvc status` is clean afterwards."""
    paired(project / "data/raw/cells", n=1, seed=5, prefix="added")
    proc = _segflow(project, prefect_api)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc.stdout += proc.stderr
    assert "data/raw/cells.dvc: the data changed; its new version is recorded" in proc.stdout
    ran = _ran(proc.stdout)
    # The export follows the model: an image that lands in the test split leaves training's result as it was.
    assert [s for s in STAGES if s != "export"] == [s for s in ran if s != "export"], proc.stdout
    assert "export" in ran or "Stage 'export' didn't change, skipping" in proc.stdout
    assert "added_000" in set(_manifest(project)["id"])
    # DVC recorded the new version of the tracked source; the workspace is consistent again.
    assert "up to date" in _dvc(project, "status").stdout
    assert _ran(_dvc(project, "repro").stdout) == []


# Slow (about 40 s): adding an image already proves a data change reruns every stage; make test-all runs it.
@pytest.mark.slow
def test_removing_an_image_reruns_the_pipeline(project):
    (project / "data/raw/cells/images/img_003.png").unlink()
    (project / "data/raw/cells/masks/img_003.png").unlink()
    proc = _dvc(project, "repro")
    assert _ran(proc.stdout) == STAGES, proc.stdout
    assert "img_003" not in set(_manifest(project)["id"])


def test_going_back_to_a_known_dataset_restores_its_results_from_the_cache(project):
    # Back to the first test's 16 images (whichever of the tests above ran): every stage ran on them before.
    for added in (project / "data/raw/cells").rglob("added_*"):
        added.unlink()
    paired(project / "data/raw/cells", n=16)  # rewrites the originals byte for byte (seeded), img_003 included
    proc = _dvc(project, "repro")
    assert _ran(proc.stdout) == [], "DVC's run cache restores every stage instead of training again"
    assert "Stage 'train' is cached" in proc.stdout
    ids = set(_manifest(project)["id"])
    assert len(ids) == 16 and "img_003" in ids and not any(i.startswith("added") for i in ids)


def test_a_bad_new_file_fails_ingest_and_keeps_the_source(project):
    raw = project / "data/raw/cells"
    shutil.copy(raw / "images/img_000.png", raw / "images/orphan.png")
    try:
        proc = _dvc(project, "repro", check=False)
    finally:
        (raw / "images/orphan.png").unlink()
    assert proc.returncode != 0
    assert "data/raw/cells/images/orphan.png: has no mask" in proc.stdout + proc.stderr
    assert (raw / "images/img_000.png").is_file()
