"""git, as the registry calls it: one function, one error message."""

from __future__ import annotations

import subprocess
from pathlib import Path

from segflow.errors import SegflowError


def git(root: Path, *args: str, check: bool = True) -> str:
    """stdout of ``git ARGS`` in ``root``.

    Raises:
        SegflowError: git failed and ``check`` is set (without ``check``, a failure gives ``""``).
    """
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        if check:
            raise SegflowError(f"git {' '.join(args)} failed in {root}: {proc.stderr.strip() or proc.stdout.strip()}")
        return ""
    return proc.stdout


def git_try(root: Path, *args: str) -> tuple[int, str]:
    """``git ARGS`` in ``root`` that may fail as part of the plan (a rejected push): (exit status, stdout+stderr).

    Never prompts: a remote that wants a password fails at once instead of waiting on a terminal nobody watches.
    """
    import os

    env = os.environ | {"GIT_TERMINAL_PROMPT": "0"}
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=env)
    return proc.returncode, (proc.stdout + proc.stderr).strip()
