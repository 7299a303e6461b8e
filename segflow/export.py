"""Stage ``export``: the saved model's weight-less folder and other formats.

Both task families write the same files, so dvc.yaml has one ``export`` stage; this module chooses the
family from ``task`` (params.yaml): :mod:`segflow.semantic.export` or :mod:`segflow.instance.export`.
"""

from __future__ import annotations


def run(params, paths):
    """The work of the family ``params.task`` names (its module is imported only then: torch and friends)."""
    if params.task == "instance":
        from segflow.instance.export import run as family_run
    else:
        from segflow.semantic.export import run as family_run
    return family_run(params, paths)
