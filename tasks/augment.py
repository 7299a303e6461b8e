"""Stage ``augment``: the albumentations pipelines for training and evaluation, and their preview.

Run by DVC as ``python -m tasks.augment`` from the project root (dvc.yaml). params.yaml is checked
before the heavy imports, so a bad value fails in a fraction of a second; the work is
:func:`segflow.augment.run`.
"""

from __future__ import annotations

from segflow.stage import preflight

if __name__ == "__main__":
    preflight("augment")  # a bad params.yaml fails here, before the imports below (seconds for torch)

from segflow.augment import run
from segflow.stage import stage_main


def main() -> None:
    stage_main(run, "augment")


if __name__ == "__main__":
    main()
