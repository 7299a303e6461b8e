"""A team on two machines, simulated with clones: one bare git origin, one Prefect server, one S3 DVC remote
(moto's server on 127.0.0.1, spoken to over HTTP by dvc-s3 as it would speak to AWS or MinIO).

Clone B runs the ``retrain`` deployment with a real ``segflow worker`` (pull, stages, push, register, git
push); clone A then sees the version after ``git fetch --tags`` and predicts with the model fetched from S3,
running no stage. Two clones registering from the same base: the first one's push is rejected (origin moved),
merged and pushed again; the second one's version number is taken, so it fails with one line and is undone.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from bench._util import fresh_project
from segflow.ops.env import stage_env
from segflow.ops.server import free_port
from tests.conftest import TINY, copy_project

pytest.importorskip("dvc_s3", reason="the S3 DVC remote needs dvc-s3: pip install -e '.[s3]' (in .[dev])")
pytest.importorskip("moto.server", reason="the S3 server of this test is moto's: pip install 'moto[server]>=5'")
pytest.importorskip("flask", reason="moto's server mode needs moto[server]")

BIN = Path(sys.executable).parent
BUCKET = "segflow-team"
#: Fake credentials moto accepts; the test asserts neither reaches a tracked file or a commit.
KEY_ID, SECRET = "AKIASEGFLOWTEAMTEST", "segflow-team-secret-do-not-commit"
MODEL = "segflow-model"


def _git(repo: Path, *args: str, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, env=stage_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} in {repo}: {proc.stdout}{proc.stderr}")
    return proc.stdout


def _segflow(repo: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "segflow"), *args], cwd=repo, capture_output=True, text=True, env=env or stage_env(), timeout=timeout
    )


def _dvc(repo: Path, *args: str, env: dict | None = None) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=repo, capture_output=True, text=True, env=env or stage_env()
    )
    assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout}{proc.stderr}"


def _without_credentials() -> dict:
    return {k: v for k, v in stage_env().items() if not k.startswith("AWS_")}


def _no_secret_in_git(repo: Path) -> None:
    """Neither the work tree's tracked files nor any commit holds the secret."""
    revs = _git(repo, "rev-list", "--all").split()
    for where in ([], revs):
        found = subprocess.run(["git", "grep", "-I", "-F", SECRET, *where], cwd=repo, capture_output=True, text=True)
        assert found.returncode == 1, f"the S3 secret is in git: {found.stdout[:500]}"


def _origin_tags(repo: Path) -> dict[str, str]:
    lines = _git(repo, "ls-remote", "--tags", "origin").splitlines()
    return {
        ref.removeprefix("refs/tags/"): sha for sha, ref in (line.split("\t") for line in lines) if "^{}" not in ref
    }


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server on 127.0.0.1 with one bucket; the credentials in this process's environment only."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one line per request in a failure's report
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as patch:
        for key, value in {"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}.items():
            patch.setenv(key, value)
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield {"endpoint": endpoint, "client": client}
    server.stop()


@pytest.fixture(scope="module")
def team(tmp_path_factory, s3) -> dict:
    """A bare origin holding the tiny project with its S3 remote configured (no secret), and clones A and B."""
    base = tmp_path_factory.mktemp("team")
    project = fresh_project(base / "seed", TINY)
    _dvc(project, "remote", "add", "-d", "store", f"s3://{BUCKET}/segflow")
    _dvc(project, "remote", "modify", "store", "endpointurl", s3["endpoint"])
    _git(project, "add", ".dvc/config")
    _git(project, "commit", "-qm", "DVC remote: the team's S3 bucket")
    _git(base, "init", "-q", "--bare", "-b", "main", str(base / "origin.git"))
    _git(project, "remote", "add", "origin", str(base / "origin.git"))
    _git(project, "push", "-q", "origin", "main")
    clones = {"seed": _git(project, "rev-parse", "HEAD").strip()}
    for name in ("a", "b"):
        _git(base, "clone", "-q", str(base / "origin.git"), name)
        clones[name] = base / name
    # Machine A keeps its credentials in .dvc/config.local (git-ignored); B takes them from the environment.
    _dvc(clones["a"], "remote", "modify", "--local", "store", "access_key_id", KEY_ID)
    _dvc(clones["a"], "remote", "modify", "--local", "store", "secret_access_key", SECRET)
    for clone in (clones["a"], clones["b"]):
        _no_secret_in_git(clone)
        assert _git(clone, "status", "--porcelain") == "", "the remote's config leaves the clone clean"
    return {"base": base, **clones}


@pytest.fixture(scope="module")
def retrained(team, prefect_api) -> dict:
    """Machine B: ``segflow deploy``, a real ``segflow worker``, one run of the retrain deployment."""
    b = team["b"]
    env = stage_env(PREFECT_API_URL=prefect_api)
    proc = _segflow(b, "deploy", env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (deployment,) = httpx.post(
        f"{prefect_api}/deployments/filter", json={"deployments": {"name": {"any_": ["retrain"]}}}, timeout=10
    ).json()
    log = (team["base"] / "worker-b.log").open("w")
    worker = subprocess.Popen(
        [str(BIN / "segflow"), "worker"],
        cwd=b,
        env=env | {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "1"},
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    started = time.monotonic()
    try:
        run = httpx.post(f"{prefect_api}/deployments/{deployment['id']}/create_flow_run", json={}, timeout=10).json()
        while run["state_type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            assert time.monotonic() - started < 300, f"the retrain run is stuck in {run['state_type']}"
            time.sleep(0.5)
            run = httpx.get(f"{prefect_api}/flow_runs/{run['id']}", timeout=10).json()
    finally:
        os.killpg(worker.pid, 2)  # SIGINT: the worker stops as on Ctrl-C
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, 9)
        log.close()
    assert run["state_type"] == "COMPLETED", (
        f"{run['state']['message']}\n{(team['base'] / 'worker-b.log').read_text()[-3000:]}"
    )
    return {"run": run, "seconds": time.monotonic() - started}


def test_machine_b_retrains_pushes_the_data_to_s3_and_the_registration_to_origin(team, s3, retrained):
    b = team["b"]
    tags = _origin_tags(b)
    version = f"{MODEL}@v0.1.0"
    assert version in tags and any(t.startswith(f"{MODEL}#prod#") for t in tags), tags
    assert tags[version] == _git(b, "rev-parse", f"refs/tags/{version}").strip(), "origin holds B's own tag"
    assert _git(b, "rev-parse", "HEAD").strip() == _git(b, "rev-parse", "origin/main").strip(), "branch pushed"
    assert _git(b, "status", "--porcelain") == ""
    # The remote holds what the tag names: the model folder's files are in the bucket.
    keys = [o["Key"] for o in s3["client"].list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert keys and all(k.startswith("segflow/files/md5/") for k in keys), keys[:5]
    lock = yaml.safe_load(_git(b, "show", f"{version}:dvc.lock"))
    (model,) = [o for o in lock["stages"]["train"]["outs"] if o["path"].endswith("model")]
    digest = model["md5"].removesuffix(".dir")
    assert f"segflow/files/md5/{digest[:2]}/{digest[2:]}.dir" in keys, "the model's directory listing is on S3"
    _no_secret_in_git(b)


def test_machine_a_sees_the_version_and_predicts_with_the_model_from_s3(team, retrained, tmp_path):
    a, b = team["a"], team["b"]
    env = _without_credentials()  # A's credentials are in its .dvc/config.local
    _git(a, "fetch", "-q", "--tags")
    listing = _segflow(a, "models", env=env)
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert "v0.1.0" in listing.stdout and "prod" in listing.stdout, listing.stdout
    images = tmp_path / "images"
    images.mkdir()
    for png in sorted((b / "data/ingest/images").glob("*.png"))[:2]:
        shutil.copy2(png, images / png.name)
    started = time.monotonic()
    proc = _segflow(a, "predict", str(images), "--model", f"{MODEL}#prod", "--out", str(tmp_path / "out"), env=env)
    seconds = time.monotonic() - started
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(p.name for p in images.iterdir())
    # The model came from S3 (A never had a DVC cache) into .segflow/models; no stage ran here.
    assert (a / ".segflow/models" / MODEL / "v0.1.0" / "model.safetensors").is_file()
    made = [p.name for p in (a / "data").iterdir() if p.name != "raw"]
    assert made == [], f"clone A ran stages or checked out outputs: {made}"
    assert _git(a, "status", "--porcelain") == ""
    _no_secret_in_git(a)
    print(f"predict in clone A (model fetched from S3): {seconds:.1f} s; B's retrain run: {retrained['seconds']:.1f} s")


@pytest.fixture(scope="module")
def rivals(team, retrained) -> tuple[Path, Path, Path]:
    """Two clones of a second origin, each holding B's trained model unregistered, from the same base commit
    (B's state before its registration: nothing is trained again), and a third clone that pushes to it."""
    b, base = team["b"], team["base"]
    _git(base, "init", "-q", "--bare", "-b", "main", str(base / "rivals.git"))
    _git(b, "push", "-q", str(base / "rivals.git"), f"{team['seed']}:refs/heads/main")
    clones = []
    for name in ("r1", "r2"):
        clone = copy_project(b, base / name)
        _git(clone, "remote", "set-url", "origin", str(base / "rivals.git"))
        _git(clone, "tag", "-d", *_git(clone, "tag").split())
        _git(clone, "reset", "-q", team["seed"])  # B's results uncommitted again, as before it registered
        shutil.rmtree(clone / "registry")
        _git(clone, "fetch", "-q", "origin")
        clones.append(clone)
    _git(base, "clone", "-q", str(base / "rivals.git"), "c")
    return clones[0], clones[1], base / "c"


def test_two_clones_register_from_one_base_the_first_merges_the_second_fails_in_one_line(rivals):
    first, second, other = rivals
    # A third machine pushes an unrelated commit: origin's main moves on under both rivals.
    (other / "NOTES.md").write_text("team notes\n")
    _git(other, "add", "NOTES.md")
    _git(other, "commit", "-qm", "notes")
    _git(other, "push", "-q", "origin", "main")
    version = f"{MODEL}@v0.1.0"

    proc = _segflow(first, "register", "--commit")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "pushed to origin (main, 2 tags) after merging origin's main" in proc.stdout, proc.stdout
    tags = _origin_tags(first)
    assert tags[version] == _git(first, "rev-parse", f"refs/tags/{version}").strip()
    assert any(t.startswith(f"{MODEL}#prod#") for t in tags), tags
    assert (first / "NOTES.md").is_file(), "origin's commit was merged in"
    assert _git(first, "rev-parse", "HEAD").strip() == _git(first, "ls-remote", "origin", "main").split()[0]

    head = _git(second, "rev-parse", "HEAD").strip()
    proc = _segflow(second, "register", "--commit")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert f"origin already has {version}" in lines[0] and "another machine registered that version first" in lines[0]
    assert "git pull" in lines[0], "the line says what to run"
    assert _origin_tags(second) == tags, "origin keeps the first registration's tags, and only those"
    assert _git(second, "tag").split() == [], "the clashing local tags are gone"
    assert _git(second, "rev-parse", "HEAD").strip() == head, "the branch is back where it was"
    # The state before registering: its results uncommitted again, no card left to complete a registration from.
    changed = {line[3:] for line in _git(second, "status", "--porcelain").splitlines()}
    assert "dvc.lock" in changed and not any(p.startswith("registry") for p in changed), changed
