"""A stage under DVC: fail fast, keep the last good outputs, stop when its caller is gone.

DVC deletes a stage's outputs just before it runs the stage's command. When
the stage then fails (bad params, bad data, no GPU, a signal), this module
puts the outputs of the last successful run back: DVC-cached outputs from
DVC's cache (by the hashes ``dvc.lock`` still holds), git-tracked ones
(``cache: false`` metrics and plots, which DVC does not cache) from a copy
the stage keeps after each success under ``.segflow/last-good/``. When the
disk is too full for those copies, they come back as links (into DVC's cache,
read-only; to the kept copy), which need no new data space, and the stage ends
with one line saying which disk filled up.

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

from segflow.disk import disk_full, free_space, no_space
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


def _copy(source: Path, target: Path, link: bool = False) -> None:
    """Replace ``target`` with a copy of ``source`` (file or folder), via a temporary sibling.

    ``link``: hard links to ``source``'s files instead of copies (no new data space; same filesystem).
    A copy that fails leaves nothing behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    _remove(tmp)
    copy_file = os.link if link else shutil.copy2
    try:
        if source.is_dir():
            shutil.copytree(source, tmp, copy_function=copy_file)
        else:
            copy_file(source, tmp)
    except BaseException:
        _remove(tmp)
        raise
    _remove(target)
    os.replace(tmp, target)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def stash(stage: str, root: Path = Path(".")) -> None:
    """Keep a copy of ``stage``'s git-tracked (``cache: false``) outputs, for :func:`restore`.

    A full disk does not fail the stage (its work is done): the copy of that output is dropped, so a later
    failure cannot put back an older one, and a warning says so.
    """
    for path, cached in stage_outputs(stage, root):
        if not cached and (root / path).exists():
            try:
                _copy(root / path, root / STASH_DIR / path)
            except OSError as error:
                if not no_space(error):
                    raise
                _remove(root / STASH_DIR / path)
                log.warning("%s: no space left to keep a copy of it (%s); a failed run cannot put it back", path, error)


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Restored(list):
    """The outputs :func:`restore` put back (a list of their paths), and how.

    Attributes:
        linked: outputs put back as links into DVC's cache (the disk was too full for copies).
        failed: outputs that could not be put back: (path, whether DVC caches it).
    """

    def __init__(self) -> None:
        super().__init__()
        self.linked: list[str] = []
        self.failed: list[tuple[str, bool]] = []

    def summary(self) -> str:
        """One clause for a one-line error: what the last good outputs are like now."""
        if not self.failed:
            said = "the last good outputs are in place"
            if self.linked:
                paths = " ".join(self.linked)
                said += (
                    f" ({', '.join(self.linked)} as read-only links into DVC's cache: "
                    f"`dvc checkout --relink {paths}` makes them copies once there is room)"
                )
            return said
        cached = [path for path, in_cache in self.failed if in_cache]
        tracked = [path for path, in_cache in self.failed if not in_cache]
        fixes = [f"`dvc checkout {' '.join(cached)}`"] if cached else []
        fixes += [f"`git checkout -- {' '.join(tracked)}`"] if tracked else []
        return (
            f"could not put back the last good {', '.join(path for path, _ in self.failed)}: "
            f"{' and '.join(fixes)} once there is room"
        )


#: What the last :func:`restore` in this process did (for the one-line error of :func:`stage_main`).
_last_restored: list[Restored] = []

#: DVC's name for a partly written file (dvc_objects.fs.utils.tmp_fname): a failed copy leaves one behind.
_DVC_PARTIAL = re.compile(r"^\.[\w-]{22}\.tmp$")


def _partial_files(folder: Path) -> set[Path]:
    return {p for p in folder.iterdir() if _DVC_PARTIAL.match(p.name)} if folder.is_dir() else set()


def _link_from_cache(out, path: Path) -> str:
    """Put DVC-cached ``out`` back at ``path`` as links to its files in DVC's cache, which take no new data
    space: hard links (same filesystem), else symbolic links, as DVC makes for ``cache.type hardlink`` /
    ``symlink``. The cache files are protected (read-only) first, as DVC protects them for linked workspaces.

    Returns:
        "hard links", "symbolic links" or both, for the log.
    """
    from dvc_data.hashfile.tree import Tree

    obj = out.get_obj()
    if obj is None:
        raise FileNotFoundError(f"{out.def_path}: DVC's cache does not hold it")
    cache = out.cache
    if isinstance(obj, Tree):
        files = [(path.joinpath(*key), cache.oid_to_path(oid.value)) for key, _, oid in obj]
    else:
        files = [(path, cache.oid_to_path(obj.hash_info.value))]
    kinds = set()
    try:
        (path if isinstance(obj, Tree) else path.parent).mkdir(parents=True, exist_ok=True)
        for target, source in files:
            if not os.path.isfile(source):
                raise FileNotFoundError(f"{source}: not in DVC's cache")
            cache.protect(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
                kinds.add("hard links")
            except OSError:  # another filesystem, or one without hard links
                os.symlink(source, target)
                kinds.add("symbolic links")
    except BaseException:
        _remove(path)  # half an output is worse than none: DVC deleted it, so none is what it knows
        raise
    return " and ".join(sorted(kinds)) or "links"


def _restore_cached(out, path: Path, done: Restored) -> None:
    """Check ``out`` out of DVC's cache (a copy, DVC's cache type here); on a full disk, links instead."""
    partial = _partial_files(path.parent)
    _remove(path)
    try:
        out.checkout(force=True)
        done.append(out.def_path)
        return
    except Exception as error:
        # DVC tries a 4-byte copy before the real one; when even that fails its error says only "no possible
        # cache link types": then the free space tells.
        if not (no_space(error) or free_space(path.parent)[1] < (out.meta.size or 1 << 20)):
            raise
        log.debug("copying %s out of DVC's cache failed: %s", out.def_path, error)
    for leftover in _partial_files(path.parent) - partial:  # DVC's half-copied file
        _remove(leftover)
    _remove(path)
    kinds = _link_from_cache(out, path)
    done.append(out.def_path)
    done.linked.append(out.def_path)
    log.warning(
        "no space left to copy %s out of DVC's cache: it is back as %s into DVC's cache (read-only); "
        "`dvc checkout --relink %s` makes it independent copies once there is room",
        out.def_path,
        kinds,
        out.def_path,
    )


def _restore_kept(out, path: Path, kept: Path, done: Restored) -> None:
    """Put back a git-tracked output from the copy :func:`stash` kept; on a full disk, hard links to it."""
    try:
        _copy(kept, path)
    except OSError as error:
        if not no_space(error):
            raise
        _copy(kept, path, link=True)
        log.warning("no space left to copy %s back: it is back as hard links to %s", out.def_path, kept)
    done.append(out.def_path)


def _open_repo(root: Path):
    """DVC's repository at ``root``; on a disk too full for DVC's state database (file hashes by inode, in its
    site cache folder, often on the same disk) one without it, which hashes what it reads instead."""
    import sqlite3
    from unittest import mock

    from dvc.repo import Repo
    from dvc_data.hashfile.state import StateNoop

    try:
        return Repo(str(root))
    except (sqlite3.OperationalError, OSError) as error:  # sqlite says "disk I/O error" when it cannot grow
        if isinstance(error, OSError) and not no_space(error):
            raise
        log.debug("DVC's state database cannot be opened (%s): restoring without it", error)
    with mock.patch("dvc_data.hashfile.state.State", lambda *args, **kwargs: StateNoop()):
        return Repo(str(root))


def restore(stage: str, root: Path = Path(".")) -> Restored:
    """Put ``stage``'s outputs back as its last successful run (the one ``dvc.lock`` records) left them.

    DVC-cached outputs come out of DVC's cache; when the disk is too full for that copy, as links into the
    cache (no new data space). Git-tracked ones come from the copy :func:`stash` keeps. An output that cannot
    be put back is logged and the others are still tried.

    Returns:
        The outputs restored (a list), with those put back as links and those that failed.
    """
    done = Restored()
    _last_restored[:] = [done]
    try:
        with _open_repo(root) as repo:
            (dvc_stage,) = repo.stage.collect(f"{os.path.join(repo.root_dir, 'dvc.yaml')}:{stage}")  # not the cwd's
            for out in dvc_stage.outs:
                if out.hash_info.value is None:  # the stage never finished: nothing to go back to
                    continue
                path = root / out.def_path
                try:
                    if path.exists() and not out.changed_checksum():
                        continue
                    if out.use_cache:
                        _restore_cached(out, path, done)
                        continue
                    kept = root / STASH_DIR / out.def_path
                    if not kept.exists():
                        continue
                    if kept.is_file() and _md5(kept) != out.hash_info.value:
                        log.warning("%s: the kept copy is not the one dvc.lock records; left as it is", out.def_path)
                        continue
                    _restore_kept(out, path, kept, done)
                except Exception as error:  # one output that cannot come back must not keep the others out
                    done.failed.append((out.def_path, out.use_cache))
                    log.warning("could not restore %s of %s: %s", out.def_path, stage, error)
    except Exception as error:
        log.warning("could not restore the outputs of %s: %s", stage, error)
        with contextlib.suppress(Exception):
            done.failed = [(str(p), cached) for p, cached in stage_outputs(stage, root) if str(p) not in done]
    if done:
        log.warning("restored the last good %s", ", ".join(done))
    return done


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

    Expected failures (:class:`SegflowError`, and a full disk: ENOSPC or EDQUOT) print one line and exit
    with status 2; a signal (or the end of the process that started the stage) prints one line and exits
    with 128 + the signal number; either way, under DVC, the outputs of the last successful run are put
    back first. Anything else keeps its traceback.
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
    except Exception as error:
        if no_space(error) is None:
            raise
        # The same run would fail the same way: one line and exit status 2 (the flow does not retry it).
        kept = f"; {_last_restored[-1].summary()}" if under_dvc() and _last_restored else ""
        say(name, f"error: {disk_full(error)}{kept}")
        sys.exit(2)
