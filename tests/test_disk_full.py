"""A disk that fills up: the last good outputs stay, and the stage says what filled up in one line.

DVC deletes a stage's outputs before it runs it; when the stage then fails because the disk is full, copying
the last good model back out of DVC's cache fails the same way. segflow/stage.py then puts it back as links into
DVC's cache (no new data space) and ends with one line naming the disk.

The real case runs ``dvc repro train`` on a small filesystem of its own (a tmpfs in a private mount namespace,
made with ``unshare``), filled up by a second writer once training has begun; the fast cases inject ENOSPC at
the file layer.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from segflow import stage
from segflow.ops.env import stage_env
from tests.conftest import ROOT, TINY, copy_project

MODEL = "data/train/model"
#: A partly written file: DVC's temporary names (.<22 characters>.tmp) and segflow's (.<name>.tmp-<pid>).
PARTIAL = re.compile(r"^\.([\w-]{22}\.tmp|.+\.tmp-\d+)$")


def _no_space(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _partial_files(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if PARTIAL.match(p.name) and ".dvc" not in p.parts]


# --- the link fallback of restore(), ENOSPC injected into DVC's copy -------------------------------------------


@pytest.fixture
def made(tmp_path) -> Path:
    """A DVC project (no git) whose stage ``make`` ran once: a cached folder ``out`` and a git-tracked
    (``cache: false``) ``metrics.json``, kept by :func:`segflow.stage.stash` as after a successful run."""
    from dvc.repo import Repo

    root = tmp_path / "made"
    root.mkdir()
    Repo.init(str(root), no_scm=True).close()
    (root / "params.yaml").write_text("{}\n")
    (root / "make.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path('out/sub').mkdir(parents=True)\n"
        "pathlib.Path('out/weights.bin').write_bytes(os.urandom(300_000))\n"
        "pathlib.Path('out/sub/card.json').write_text('{\"name\": \"%s\"}' % ('x' * 100))\n"
        "pathlib.Path('metrics.json').write_text('{\"iou\": 0.5, \"note\": \"%s\"}' % ('y' * 100))\n"
    )
    spec = {"cmd": f"{sys.executable} make.py", "outs": ["out"], "metrics": [{"metrics.json": {"cache": False}}]}
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"make": spec}}))
    with Repo(str(root)) as repo:
        repo.reproduce(f"{root / 'dvc.yaml'}:make")
    stage.stash("make", root)
    return root


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted([*(root / "out").rglob("*"), root / "metrics.json"])
        if p.is_file()
    }


def _half_copy(source, target, *_args, **_kwargs):
    """A copy on a disk with room for a few bytes (DVC's 4-byte link test passes), not for an output: half of
    the bytes written, then ENOSPC."""
    data = Path(source).read_bytes()
    Path(target).write_bytes(data[: min(len(data) // 2, 64)])
    if len(data) > 64:
        _no_space()


def _dvc_status(root: Path) -> dict:
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return repo.status()


@pytest.mark.parametrize("links", ["hard", "symbolic", "hard-no-room-for-dvc-link-test"])
def test_restore_on_a_full_disk_links_into_dvc_cache(made, monkeypatch, links):
    before = _digests(made)
    shutil.rmtree(made / "out")  # what DVC does before it runs the stage again
    (made / "metrics.json").unlink()
    # Every copy fails for lack of space, after writing half of the file (DVC's copy, and segflow's own).
    monkeypatch.setattr("dvc_objects.fs.local.copyfile", _half_copy)
    monkeypatch.setattr(shutil, "copy2", _half_copy)
    if links == "hard-no-room-for-dvc-link-test":  # not even 4 bytes: DVC's error names no cause
        monkeypatch.setattr("dvc_objects.fs.local.copyfile", _no_space)
        monkeypatch.setattr(stage, "free_space", lambda path: (Path("/"), 0))
    if links == "symbolic":  # the cache on another filesystem: no hard links into it
        real_link, cache = os.link, str(made / ".dvc" / "cache")

        def link(source, target, *args, **kwargs):
            if str(source).startswith(cache):
                raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
            return real_link(source, target, *args, **kwargs)

        monkeypatch.setattr(os, "link", link)

    done = stage.restore("make", made)

    assert sorted(done) == ["metrics.json", "out"] and done.linked == ["out"] and not done.failed
    assert _digests(made) == before, "the last good outputs, byte for byte"
    assert not _partial_files(made), "the half-copied files are gone"
    for path in (made / "out").rglob("*"):
        if path.is_dir() and not path.is_symlink():
            continue
        digest = hashlib.md5(path.read_bytes()).hexdigest()
        in_cache = made / ".dvc/cache/files/md5" / digest[:2] / digest[2:]
        if links != "symbolic":
            assert not path.is_symlink() and path.samefile(in_cache) and path.stat().st_nlink == 2
        else:
            assert path.is_symlink() and Path(os.readlink(path)).resolve() == in_cache.resolve()
        assert in_cache.stat().st_mode & 0o777 == 0o444, "DVC's cache file is protected (read-only) through the link"
    assert (made / "metrics.json").samefile(made / stage.STASH_DIR / "metrics.json")
    assert _dvc_status(made) == {}, "DVC sees the outputs dvc.lock records"
    assert "dvc checkout --relink out" in done.summary()


def test_restore_that_cannot_link_either_says_what_is_missing(made, monkeypatch):
    shutil.rmtree(made / "out")
    monkeypatch.setattr("dvc_objects.fs.local.copyfile", _half_copy)
    monkeypatch.setattr(os, "link", _no_space)  # a directory that cannot grow: no new names either
    monkeypatch.setattr(os, "symlink", _no_space)

    done = stage.restore("make", made)

    assert done.failed == [("out", True)] and not (made / "out").exists()
    assert not _partial_files(made)
    assert done.summary() == "could not put back the last good out: `dvc checkout out` once there is room"


def test_a_full_disk_after_a_good_run_drops_the_kept_copy_and_keeps_the_run(made, monkeypatch, caplog):
    (made / "metrics.json").write_text(json.dumps({"iou": 0.75, "note": "z" * 100}))  # the new run's metrics
    monkeypatch.setattr(shutil, "copy2", _half_copy)

    stage.stash("make", made)  # no exception: the stage did its work

    assert not (made / stage.STASH_DIR / "metrics.json").exists(), "no older copy left for a later restore"
    assert not _partial_files(made)
    assert "no space left to keep a copy" in caplog.text


# --- one line instead of a traceback ----------------------------------------------------------------------------


@pytest.fixture
def outside_dvc(tmp_path, monkeypatch) -> Path:
    """A folder with a valid params.yaml, as the current folder; no DVC_ROOT (a stage run by hand)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    return tmp_path


def _writes_into_full_disk(target: Path, error: BaseException, params, paths) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with target.open("wb") as handle:
        handle.write(b"weights")
        raise error  # as write() or close() raise it: no file name in the error


@pytest.mark.parametrize(
    ("error", "what"),
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "no space left"),
        (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "no space left (disk quota exceeded)"),
        # A library that wraps the OS error in its own (safetensors, say) keeps its message.
        (RuntimeError("Error while serializing: IoError(No space left on device)"), "no space left"),
    ],
    ids=["ENOSPC", "EDQUOT", "wrapped"],
)
def test_a_full_disk_is_one_line_naming_the_file_and_the_disk(outside_dvc, capsys, error, what):
    run = functools.partial(_writes_into_full_disk, outside_dvc / "data" / "train" / "weights.bin", error)
    with pytest.raises(SystemExit) as stopped:
        stage.stage_main(run, "train")
    assert stopped.value.code == 2, "a full disk fails the same way again: not retried (segflow/ops/runner.py)"
    mount, _ = stage.free_space(outside_dvc)
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(
        rf"segflow train: error: {re.escape(what)} on the disk holding data/train/weights\.bin "
        rf"\([\d.]+ MB free on {re.escape(str(mount))}\): free some space and rerun",
        line,
    ), line


def test_a_full_disk_with_no_file_to_name_names_the_project(outside_dvc, capsys):
    with pytest.raises(SystemExit):
        stage.stage_main(lambda params, paths: _no_space(), "train")
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"segflow train: error: no space left on the disk holding {outside_dvc} ("), line


def test_other_os_errors_keep_their_traceback(outside_dvc):
    error = PermissionError(errno.EACCES, os.strerror(errno.EACCES), "data/x")
    with pytest.raises(PermissionError):
        stage.stage_main(functools.partial(_writes_into_full_disk, outside_dvc / "data" / "x", error), "train")


def test_mount_point_and_free_space_of_a_path_not_yet_written(tmp_path):
    mount, free = stage.free_space(tmp_path / "not" / "yet" / "there.bin")
    assert os.path.ismount(mount) and tmp_path.resolve().is_relative_to(mount)
    assert free == shutil.disk_usage(tmp_path).free


# --- the real thing: `dvc repro train` on a small filesystem that fills up during training ----------------------


@functools.cache
def _namespace() -> tuple[list[str] | None, str]:
    """The ``unshare`` prefix whose commands run in a private mount namespace where they can mount a tmpfs
    (root: ``unshare -m``; others: a user namespace, ``unshare -r -m``), or None and why not."""
    if not shutil.which("unshare") or not shutil.which("mount"):
        return None, "unshare or mount is not installed"
    probe = tempfile.mkdtemp(prefix="segflow-mount-probe-")
    why = ""
    try:
        for prefix in (["unshare", "-m"], ["unshare", "-r", "-m"]):
            try:
                proc = subprocess.run(
                    [*prefix, "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe} && touch {probe}/x"],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
            except (OSError, subprocess.TimeoutExpired) as error:
                why = str(error)
                continue
            if proc.returncode == 0 and not os.listdir(probe):
                return prefix, ""
            why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit status {proc.returncode}"
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    return None, why


def _fill(path: Path) -> int:
    """Write zeros into ``path`` until the disk is full, to the last byte; the bytes written."""
    written, chunk = 0, b"\0" * (1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while chunk:
            try:
                written += os.write(fd, chunk)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)
    return written


def _model(project: Path) -> dict[str, dict]:
    """Each model file: sha256, and whether it is a link into DVC's cache (and read-only)."""
    found = {}
    for path in sorted((project / MODEL).iterdir()) if (project / MODEL).is_dir() else []:
        data = path.read_bytes()
        md5 = hashlib.md5(data).hexdigest()
        found[path.name] = {
            "sha256": hashlib.sha256(data).hexdigest(),
            "linked": path.is_symlink() or path.samefile(project / ".dvc/cache/files/md5" / md5[:2] / md5[2:]),
            "writable": bool(path.stat().st_mode & 0o222),
        }
    return found


def _dvc(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, capture_output=True, text=True, timeout=240
    )


def _inside(source: str, disk: str, report: str) -> None:
    """Run in a private mount namespace: a tmpfs just big enough for a copy of ``source``, where ``dvc repro
    train --force`` runs while a second writer fills the disk once training has begun; what happened goes to
    ``report`` (JSON, outside the tmpfs, which goes away with the namespace)."""
    source, disk = Path(source), Path(disk)
    disk.mkdir(parents=True, exist_ok=True)
    size = sum(-(-p.stat().st_size // 4096) * 4096 for p in source.rglob("*") if p.is_file() and not p.is_symlink())
    size += 16 << 20  # DVC's lock and state, the stage's first checkpoint folder and .pyc files
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "segflow-test", str(disk)], check=True)
    project = copy_project(source, disk / "project")
    for old in (project / ".segflow" / "checkpoints").glob("train-*"):
        shutil.rmtree(old)  # the filler below starts when this run's checkpoint folder appears
    # DVC's own state (file hashes by inode) on the same disk, as /var/tmp is on a one-disk machine.
    (project / ".dvc" / "config.local").write_text(f"[core]\n    site_cache_dir = {disk / 'dvc-site'}\n")
    facts: dict = {"size": size}

    def fill_once_training_began() -> None:
        deadline = time.monotonic() + 180
        while not list((project / ".segflow" / "checkpoints").glob("train-*")):  # DVC deleted the model by now
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        facts["filled"] = _fill(disk / "filler")

    filler = threading.Thread(target=fill_once_training_began, daemon=True)
    filler.start()
    started = time.monotonic()
    repro = _dvc(project, "repro", "--single-item", "train", "--force")
    filler.join(timeout=5)
    facts |= {"seconds": round(time.monotonic() - started, 1), "rc": repro.returncode, "stderr": repro.stderr}
    facts["free"] = shutil.disk_usage(disk).free
    facts["model"] = _model(project)
    facts["lock"] = hashlib.sha256((project / "dvc.lock").read_bytes()).hexdigest()
    facts["partial"] = _partial_files(project)
    (disk / "filler").unlink(missing_ok=True)  # the user frees some space
    facts["status"] = _dvc(project, "status").stdout
    relink = _dvc(project, "checkout", "--relink", MODEL)
    facts["relink"] = {"rc": relink.returncode, "output": relink.stdout + relink.stderr, "model": _model(project)}
    facts["status_after_relink"] = _dvc(project, "status").stdout
    Path(report).write_text(json.dumps(facts))


def test_a_disk_that_fills_during_training_keeps_the_last_good_model(reproduced, tmp_path):
    prefix, why = _namespace()
    if prefix is None:
        pytest.skip(f"cannot mount a small filesystem in a private mount namespace here: {why}")
    before = _model(reproduced.path)
    lock = hashlib.sha256((reproduced.path / "dvc.lock").read_bytes()).hexdigest()
    disk, report = tmp_path / "disk", tmp_path / "report.json"
    code = "import sys; from tests.test_disk_full import _inside; _inside(*sys.argv[1:])"
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", code, str(reproduced.path), str(disk), str(report)],
        cwd=ROOT,
        env=stage_env(),
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    facts = json.loads(report.read_text())
    stderr = facts["stderr"]
    assert facts.get("filled", 0) > 0, f"the disk was not filled during training:\n{stderr[-3000:]}"

    assert facts["rc"] != 0 and "exited with 2" in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("segflow ")]
    assert len(errors) == 1, stderr[-3000:]
    (line,) = errors
    assert re.match(
        rf"segflow train: error: no space left on the disk holding data/train/\S+ "
        rf"\([\d.]+ MB free on {re.escape(str(disk.resolve()))}\): free some space and rerun; "
        rf"the last good outputs are in place \({MODEL}(, \S+)* as read-only links into DVC's cache: "
        rf"`dvc checkout --relink {MODEL}( \S+)*` makes them copies once there is room\)$",
        line,
    ), line
    assert "Traceback" not in stderr, stderr[-3000:]
    assert facts["free"] < 1 << 20, "the disk was still full when the stage ended"

    assert {name: f["sha256"] for name, f in facts["model"].items()} == {n: f["sha256"] for n, f in before.items()}
    assert all(f["linked"] and not f["writable"] for f in facts["model"].values()), facts["model"]
    assert facts["lock"] == lock, "dvc.lock is unchanged"
    assert not facts["partial"], "no half-copied file is left"
    assert "Data and pipelines are up to date" in facts["status"], facts["status"]

    # Once there is room, the command the line names turns the links into copies, and nothing changes for DVC.
    relinked = facts["relink"]
    assert relinked["rc"] == 0, relinked["output"]
    assert relinked["model"] == before, "independent, writable copies, byte for byte"
    assert "Data and pipelines are up to date" in facts["status_after_relink"], facts["status_after_relink"]
