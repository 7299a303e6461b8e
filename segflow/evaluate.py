"""Stage ``evaluate``: score the saved model on the test split with its family's metrics.

Both task families write the same files, so dvc.yaml has one ``evaluate`` stage; this module chooses the
family from ``task`` (params.yaml): :mod:`segflow.semantic.evaluate` or :mod:`segflow.instance.evaluate`.
"""

from __future__ import annotations


def run(params, paths):
    """The work of the family ``params.task`` names (its module is imported only then: torch and friends)."""
    if params.task == "instance":
        from segflow.instance.evaluate import run as family_run
    else:
        from segflow.semantic.evaluate import run as family_run
    return family_run(params, paths)
