"""Stage ``ingest``: bring a dataset into the project's layout, checked and normalised.

Run by DVC as ``python -m tasks.ingest`` from the project root (dvc.yaml). params.yaml is checked
before the heavy imports, so a bad value fails in a fraction of a second; the work is
:func:`segflow.data.ingest.run`.
"""

from __future__ import annotations

from segflow.stage import preflight

if __name__ == "__main__":
    preflight("ingest")  # a bad params.yaml fails here, before the imports below (seconds for torch)

from segflow.data.ingest import run
from segflow.stage import stage_main


def main() -> None:
    stage_main(run, "ingest")


if __name__ == "__main__":
    main()
