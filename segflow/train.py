"""Stage ``train``: fit the model the params' task family names (Lightning, DVCLive), save it with its card.

Both task families write the same files, so dvc.yaml has one ``train`` stage; this module chooses the
family from ``task`` (params.yaml): :mod:`segflow.semantic.train` or :mod:`segflow.instance.train`.
"""

from __future__ import annotations


def run(params, paths, checkpoint_root=None, started=None):
    """The work of the family ``params.task`` names (its module is imported only then: torch and friends)."""
    if params.task == "instance":
        from segflow.instance.train import run as family_run
    else:
        from segflow.semantic.train import run as family_run
    return family_run(params, paths, checkpoint_root=checkpoint_root, started=started)
