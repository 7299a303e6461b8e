"""ISBI 2012 cells: Mask R-CNN against a semantic U-Net's connected components (see bench/instance.py)."""

from __future__ import annotations

from pathlib import Path

from bench.instance import ISBI, _isbi

TITLE = "ISBI 2012 cells: Mask R-CNN against a semantic model's connected components (CPU)"


def run(work: Path) -> str:
    if not ISBI.is_dir():
        return f"Skipped: {ISBI} is not here."
    return "\n".join(_isbi(work))
