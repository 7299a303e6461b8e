"""Where a model came from: the git commit (and whether the tree is dirty), params digest, data and model hashes.

Recorded in every run's summary and in every registered version's card and tag message."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import yaml

from segflow.layout import MODEL_DIR
from segflow.params import load_params
from segflow.registry.git import git


def provenance(root: Path) -> dict:
    """Git commit (and whether tracked files differ from it), params digest, data and model hashes."""
    lock_path = root / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text()) if lock_path.is_file() else {}
    stages = (lock or {}).get("stages", {})
    params = load_params(root / "params.yaml")

    def out_hash(stage: str, path: Path) -> str | None:
        for out in stages.get(stage, {}).get("outs", []):
            if out.get("path") == str(path):
                return out.get("md5")
        return None

    canonical = json.dumps(params.model_dump(mode="json"), sort_keys=True).encode()
    return {
        "commit": git(root, "rev-parse", "HEAD", check=False).strip() or None,
        "dirty": bool(git(root, "status", "--porcelain", "--untracked-files=no", check=False).strip()),
        "params_sha256": hashlib.sha256(canonical).hexdigest()[:16],
        "data_md5": out_hash("ingest", params.paths.ingest),
        "model_md5": out_hash("train", params.paths.train / MODEL_DIR),
    }
