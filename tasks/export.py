"""Stage ``export``: the trained model in other formats (ONNX), each checked against PyTorch.

Run by DVC as ``python -m tasks.export`` from the project root (dvc.yaml), after train; its own stage, so
switching a format on or off retrains nothing. params.yaml is checked before the heavy imports; the work
is :func:`segflow.export.run` (the family ``task`` names).
"""

from __future__ import annotations

from segflow.stage import preflight

if __name__ == "__main__":
    preflight("export")  # a bad params.yaml fails here, before the imports below (seconds for torch)

from segflow.export import run
from segflow.stage import stage_main


def main() -> None:
    stage_main(run, "export")


if __name__ == "__main__":
    main()
