"""Stage ``train``: fit the model with Lightning, log with DVCLive, save it with its card.

Run by DVC as ``python -m tasks.train`` from the project root (dvc.yaml). params.yaml is checked
before the heavy imports, so a bad value fails in a fraction of a second; the work is the task
family's: :func:`segflow.train.run` (the family ``task`` names).
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()  # before the heavy imports: start-up is reported from here

from segflow.stage import preflight

if __name__ == "__main__":
    preflight("train")  # a bad params.yaml fails here, before the imports below (seconds for torch)

import functools

from segflow.stage import STATE_DIR, stage_main
from segflow.train import run

#: Where the stage keeps its resumable checkpoints, relative to the project root.
CHECKPOINTS = STATE_DIR / "checkpoints"


def main() -> None:
    stage_main(functools.partial(run, checkpoint_root=CHECKPOINTS, started=STARTED), "train")


if __name__ == "__main__":
    main()
