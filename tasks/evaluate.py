"""Stage ``evaluate``: score the trained model on the test split (IoU and Dice, per class and image).

Run by DVC as ``python -m tasks.evaluate`` from the project root (dvc.yaml). params.yaml is checked
before the heavy imports, so a bad value fails in a fraction of a second; the work is
:func:`segflow.evaluate.run` (the family ``task`` names).
"""

from __future__ import annotations

from segflow.stage import preflight

if __name__ == "__main__":
    preflight("evaluate")  # a bad params.yaml fails here, before the imports below (seconds for torch)

from segflow.evaluate import run
from segflow.stage import stage_main


def main() -> None:
    stage_main(run, "evaluate")


if __name__ == "__main__":
    main()
