"""A stage under DVC: fail fast, keep the last good outputs, stop when its caller is gone.

DVC deletes a stage's outputs just before it runs the stage's command. When
the stage then fails (bad params, bad data, no GPU, a signal), this module
puts the outputs of the last successful run back: DVC-cached outputs from
DVC's cache (by the hashes ``dvc.lock`` still holds), git-tracked ones
(``cache: false`` metrics and plots, which DVC does not cache) from a copy
the stage keeps after each success under ``.segflow/last-good/``.

When ``segflow run`` (or a Prefect worker's flow process) starts a stage it
names itself in ``SEGFLOW_PARENT``; the stage watches that process and stops,
restoring its outputs, within a second of it disappearing (even after a
SIGKILL, which the parent cannot pass on).

Nothing here runs unless DVC started the stage (``DVC_ROOT`` is set): a stage
called directly (tests, notebooks) writes where it is told and nothing more."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import yaml

from segflow.errors import SegflowError
from segflow.proc import is_alive, process_identity

log = logging.getLogger(__name__)
#: Environment variable naming the process that owns this stage run ("pid:start-time").
PARENT_ENV = "SEGFLOW_PARENT"
#: segflow's scratch and bookkeeping, inside the project; ignored by git and DVC.
STATE_DIR = Path(".segflow")
STASH_DIR = STATE_DIR / "last-good"


class Interrupted(BaseException):
    """The stage was asked to stop (a signal, or its parent process is gone)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _watch_parent(identity: str, interval: float = 0.5) -> None:
    """Send this process SIGTERM once the parent ``identity`` is gone (a daemon thread)."""

    def watch() -> None:
        while is_alive(identity):
            time.sleep(interval)
        _stop_reason.append(f"its parent process {identity.split(':')[0]} is gone")
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="segflow-parent-watch", daemon=True).start()


_stop_reason: list[str] = []


def _raise_interrupted(signum, _frame) -> None:
    reason = _stop_reason[-1] if _stop_reason else f"signal {signal.Signals(signum).name}"
    raise Interrupted(reason)


def under_dvc() -> bool:
    """Whether DVC started this process as a stage command."""
    return bool(os.environ.get("DVC_ROOT"))


def secondary_rank() -> bool:
    """Whether this is a training process other than rank 0 of a DDP run (Lightning, torchrun or SLURM
    started it). Such a process writes nothing to the project: outputs and their bookkeeping are rank 0's."""
    return any(int(os.environ.get(name, "0") or 0) > 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def _arm(stage: str) -> None:
    """Once per process: signals raise :class:`Interrupted`, the parent is watched, and an exception
    nobody catches (during the stage's imports, say) still puts the outputs back before the process ends."""
    if _armed:
        return
    _armed.append(stage)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupted)
    if os.environ.get(PARENT_ENV):
        _watch_parent(os.environ[PARENT_ENV])
    default_hook = sys.excepthook

    def last_resort(kind, error, tb) -> None:
        restore(stage)
        if isinstance(error, Interrupted | KeyboardInterrupt):
            say(stage, f"stopped ({getattr(error, 'reason', 'interrupted')}) while starting")
            sys.stderr.flush()
            os._exit(exit_code(error))
        default_hook(kind, error, tb)

    sys.excepthook = last_resort


_armed: list[str] = []


@contextlib.contextmanager
def guarded(stage: str) -> Iterator[None]:
    """Run a stage's body: on success keep a copy of its git-tracked outputs, on any failure restore.

    Outside DVC (no ``DVC_ROOT``), and in DDP processes other than rank 0, it does nothing.
    """
    if not under_dvc() or secondary_rank():
        yield
        return
    _arm(stage)
    prune_scratch()
    try:
        yield
    except BaseException:
        # Ignore further signals while putting things back: a half-restored output is worse.
        for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
            signal.signal(signum, signal.SIG_IGN)
        restore(stage)
        raise
    stash(stage)


_REF = re.compile(r"\$\{\s*([\w.]+)\s*\}")


def _lookup(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def stage_outputs(stage: str, root: Path = Path(".")) -> list[tuple[Path, bool]]:
    """The outputs ``dvc.yaml`` declares for ``stage`` (``${...}`` resolved from params.yaml), with their
    ``cache`` flag. Read without importing DVC (a test checks it agrees with DVC's own reading)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"][stage]
    params = yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")) or {}
    found = []
    for key in ("outs", "metrics", "plots"):
        for entry in spec.get(key, []):
            path, options = next(iter(entry.items())) if isinstance(entry, dict) else (entry, {})
            options = options or {}
            resolved = _REF.sub(lambda m: str(_lookup(params, m.group(1))), path)
            found.append((Path(resolved), bool(options.get("cache", True))))
    return found


def _copy(source: Path, target: Path) -> None:
    """Replace ``target`` with a copy of ``source`` (file or folder), via a temporary sibling."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    _remove(tmp)
    if source.is_dir():
        shutil.copytree(source, tmp)
    else:
        shutil.copy2(source, tmp)
    _remove(target)
    os.replace(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def stash(stage: str, root: Path = Path(".")) -> None:
    """Keep a copy of ``stage``'s git-tracked (``cache: false``) outputs, for :func:`restore`."""
    for path, cached in stage_outputs(stage, root):
        if not cached and (root / path).exists():
            _copy(root / path, root / STASH_DIR / path)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def restore(stage: str, root: Path = Path(".")) -> list[str]:
    """Put ``stage``'s outputs back as its last successful run (the one ``dvc.lock`` records) left them.

    Returns:
        The outputs restored.
    """
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    restored = []
    try:
        with Repo(str(root)) as repo:
            (dvc_stage,) = repo.stage.collect(stage)
            for out in dvc_stage.outs:
                if out.hash_info.value is None:  # the stage never finished: nothing to go back to
                    continue
                path = root / out.def_path
                if path.exists() and not out.changed_checksum():
                    continue
                if out.use_cache:
                    _remove(path)
                    out.checkout(force=True)
                    restored.append(out.def_path)
                    continue
                kept = root / STASH_DIR / out.def_path
                if not kept.exists():
                    continue
                if kept.is_file() and _md5(kept) != out.hash_info.value:
                    log.warning("%s: the kept copy is not the one dvc.lock records; left as it is", out.def_path)
                    continue
                _copy(kept, path)
                restored.append(out.def_path)
    except DvcException as error:
        log.warning("could not restore the outputs of %s: %s", stage, error)
    if restored:
        log.warning("restored the last good %s", ", ".join(restored))
    return restored


@contextlib.contextmanager
def scratch(name: str) -> Iterator[Path]:
    """A fresh folder for this process's scratch files (checkpoints), removed afterwards.

    Under DVC it lives in the project (``.segflow/tmp/<name>-<pid>-<start>``), where a kill cannot
    leave it behind for long: :func:`prune_scratch` removes it once the process is gone. Elsewhere it
    is a system temporary folder.
    """
    if under_dvc():
        path = STATE_DIR / "tmp" / f"{name}-{process_identity().replace(':', '-')}"
        path.mkdir(parents=True, exist_ok=True)
    else:
        path = Path(tempfile.mkdtemp(prefix=f"segflow-{name}-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def prune_scratch(root: Path = Path(".")) -> list[Path]:
    """Remove scratch folders whose process has ended."""
    removed = []
    for path in sorted((root / STATE_DIR / "tmp").glob("*-*-*")):
        *_, pid, start = path.name.split("-")
        if not is_alive(f"{pid}:{start}"):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def preflight(stage: str) -> None:
    """The first thing a stage does when run as a command, before its heavy imports (torch takes seconds):
    check params.yaml, and on a bad value put back what DVC deleted and stop with one line."""
    from segflow.params import ParamsError, load_params

    if under_dvc():
        _arm(stage)
    try:
        load_params()
    except ParamsError as error:
        if under_dvc():
            restore(stage)
        say(stage, f"error: {error}")
        sys.exit(2)


def exit_code(error: BaseException) -> int:
    """The process exit status for a stop: 128 + the signal number, as shells report it."""
    if isinstance(error, KeyboardInterrupt):
        return 128 + signal.SIGINT
    return 128 + signal.SIGTERM


def say(stage: str, message: str) -> None:
    """One line on stderr; silent when nobody reads it any more (the caller was killed)."""
    with contextlib.suppress(OSError):
        print(f"segflow {stage}: {message}", file=sys.stderr, flush=True)


def stage_main(run: Callable, name: str) -> None:
    """Entry point of ``python -m tasks.<name>``: load params.yaml, call ``run`` under :func:`guarded`.

    Expected failures (:class:`SegflowError`) print one line and exit with status 2; a signal (or the
    end of the process that started the stage) prints one line and exits with 128 + the signal number;
    either way, under DVC, the outputs of the last successful run are put back first. Anything else
    keeps its traceback.
    """
    from segflow.params import load_params

    logging.basicConfig(level=logging.INFO, format=f"[{name}] %(levelname)s %(message)s")
    try:
        with guarded(name):
            params = load_params()
            run(params, params.paths)
    except SegflowError as error:
        say(name, f"error: {error}")
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted) as error:
        reason = getattr(error, "reason", "interrupted")
        kept = "; the outputs of its last successful run are in place" if under_dvc() else ""
        say(name, f"stopped ({reason}){kept}")
        sys.exit(exit_code(error))
