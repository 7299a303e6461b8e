"""Shared fixtures: a tiny seeded configuration, isolated environment, project paths."""

from __future__ import annotations

import os
from pathlib import Path

# huggingface_hub reads this once, at import: set it before anything imports smp,
# so a hub name fails at once instead of waiting on the network.
os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from tasks.params import Params, parse_params

ROOT = Path(__file__).resolve().parents[1]
# The real ISBI 2012 membrane set, read in place (never copied); SEGFLOW_ISBI2012 points elsewhere.
ISBI = Path(os.environ.get("SEGFLOW_ISBI2012", ROOT.parent / "shared" / "datasets" / "isbi2012-membrane"))

# A configuration small enough for a CPU test: 32x32 scenes, a shallow net, one epoch.
TINY = {
    "seed": 3,
    "ingest": {
        "workers": 1,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "synthetic": {"num_images": 24, "image_size": 32, "min_objects": 1, "max_objects": 3},
    },
    "augment": {"crop_size": 32, "preview_samples": 2},
    "train": {
        "arch": "Unet",
        "encoder": "resnet18",
        "encoder_depth": 3,
        "decoder_channels": [16, 8, 4],
        "epochs": 1,
        "batch_size": 4,
        "accelerator": "cpu",
    },
    "evaluate": {"batch_size": 4, "preview_samples": 2},
}


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path_factory, monkeypatch):
    """No network, no telemetry, no writes to the user's Prefect home, a git identity."""
    home = tmp_path_factory.mktemp("prefect-home")
    for key, value in {
        "HF_HUB_OFFLINE": "1",
        "DVC_NO_ANALYTICS": "1",
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "GIT_AUTHOR_NAME": "segflow tests",
        "GIT_AUTHOR_EMAIL": "tests@segflow.invalid",
        "GIT_COMMITTER_NAME": "segflow tests",
        "GIT_COMMITTER_EMAIL": "tests@segflow.invalid",
    }.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def tiny_params() -> Params:
    return parse_params(TINY)


@pytest.fixture
def tiny_paths(tiny_params, tmp_path):
    return tiny_params.paths.under(tmp_path)


def isbi_or_skip() -> Path:
    if not (ISBI / "images").is_dir():
        pytest.skip(f"ISBI 2012 dataset not found at {ISBI}")
    return ISBI
