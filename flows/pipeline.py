"""The Prefect flow over the DVC pipeline: the entrypoint of the ``retrain`` deployment.

``segflow deploy`` registers ``flows/pipeline.py:pipeline`` as the deployment's entrypoint, so a
worker started in a clone of the project loads this file from the project root; the flow itself
is :func:`segflow.ops.pipeline.pipeline` (one Prefect task per DVC stage, ``dvc repro`` underneath).
"""

from __future__ import annotations

from segflow.ops.pipeline import pipeline

__all__ = ["pipeline"]
