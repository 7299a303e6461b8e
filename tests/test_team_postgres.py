"""A team's Prefect server on a real PostgreSQL: `segflow server --database`, a deployment run by a real worker,
and the run's history (state, logs) read back after the server is stopped and started again.

PostgreSQL is started here, on 127.0.0.1 and a free port, from a fresh ``initdb`` in a temporary folder; where
its programs are missing (or cannot run unprivileged) the PostgreSQL tests skip, naming what to install.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from bench._util import fresh_project
from segflow.errors import SegflowError
from segflow.ops.database import check_database, database_url, mask_password, server_database
from segflow.ops.env import stage_env
from segflow.ops.server import free_port, healthy, server_env
from tests.conftest import ROOT, TINY, run_children

BIN = Path(sys.executable).parent
# Characters a URL must escape, so the test also checks the escaping reaches asyncpg intact.
PASSWORD = "s3cret@team/db:pw"


def _tool(name: str) -> str | None:
    """A PostgreSQL program: on PATH, in Debian's versioned folders (newest first), or in /usr/local/bin."""
    version = lambda path: [int(part) for part in Path(path).parts[4].split(".") if part.isdigit()]  # noqa: E731
    versioned = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=version)
    found = [shutil.which(name), *reversed(versioned), f"/usr/local/bin/{name}"]
    return next((path for path in found if path and os.access(path, os.X_OK)), None)


@dataclass(frozen=True)
class Postgres:
    port: int
    #: The ``segflow`` role's URL, as a team writes it (plain ``postgresql://``, password escaped).
    url: str
    folder: Path

    def query(self, sql: str) -> list:
        """Rows of ``sql`` run as the ``segflow`` role over TCP (what Prefect's server sees)."""

        async def fetch():
            import asyncpg

            connection = await asyncpg.connect(self.url, timeout=10)
            try:
                return await connection.fetch(sql)
            finally:
                await connection.close()

        return asyncio.run(fetch())


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL on 127.0.0.1 with a ``segflow`` role owning a ``segflow`` database.

    PostgreSQL refuses to run as root: as root, it runs as the ``postgres`` user (else ``nobody``) in a
    folder that user owns, outside pytest's temporary folder (root's, mode 700).
    """
    tools = {name: _tool(name) for name in ("initdb", "pg_ctl", "postgres")}
    if None in tools.values():
        missing = ", ".join(name for name, path in tools.items() if path is None)
        pytest.skip(f"PostgreSQL not installed ({missing} not found): apt-get install postgresql")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="segflow-postgres-"))
    if os.geteuid() == 0:
        user = next((u for u in ("postgres", "nobody") if _user_exists(u)), None)
        if user is None or shutil.which("runuser") is None:
            shutil.rmtree(folder)
            pytest.skip("running as root with no runuser or unprivileged user to run PostgreSQL as")
        as_user = ["runuser", "-u", user, "--"]
        os.chown(folder, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    data, port = folder / "data", free_port()
    init = subprocess.run(
        [*as_user, tools["initdb"], "-D", str(data), "-U", "postgres", "-A", "trust", "-N", "-E", "UTF8"],
        capture_output=True,
        text=True,
    )
    if init.returncode != 0:
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"initdb failed, cannot run PostgreSQL here: {(init.stderr or init.stdout).strip()[-300:]}")
    # Only the superuser may skip passwords, and only over the socket in our folder; TCP asks for one.
    (data / "pg_hba.conf").write_text("local all postgres trust\nhost all all 127.0.0.1/32 scram-sha-256\n")
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off -c full_page_writes=off"
    pg_ctl = [*as_user, tools["pg_ctl"], "-D", str(data)]
    start = subprocess.run(
        [*pg_ctl, "-l", str(folder / "postgres.log"), "-w", "-t", "60", "-o", options, "start"],
        capture_output=True,
        text=True,
    )
    if start.returncode != 0:
        log = (folder / "postgres.log").read_text()[-500:] if (folder / "postgres.log").is_file() else ""
        shutil.rmtree(folder, ignore_errors=True)
        pytest.skip(f"PostgreSQL would not start here: {(start.stderr or start.stdout).strip()[-200:]} {log.strip()}")
    try:
        # What a team does once (README: the Prefect server on PostgreSQL), here through asyncpg.
        _as_superuser(
            folder,
            port,
            f"CREATE ROLE segflow LOGIN PASSWORD '{PASSWORD}'",
            "CREATE DATABASE segflow OWNER segflow",
            "CREATE DATABASE locked",  # owned by the superuser: segflow may connect, not create tables
        )
        yield Postgres(port, f"postgresql://segflow:{quote(PASSWORD, safe='')}@127.0.0.1:{port}/segflow", folder)
    finally:
        subprocess.run([*pg_ctl, "-m", "fast", "-w", "stop"], capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _as_superuser(socket_dir: Path, port: int, *statements: str) -> None:
    async def run():
        import asyncpg

        connection = await asyncpg.connect(host=str(socket_dir), port=port, user="postgres", database="postgres")
        try:
            for sql in statements:
                await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(run())


def _segflow(*args: str, cwd: Path = ROOT, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "segflow"), *args],
        cwd=cwd,
        env=stage_env(**env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class _Server:
    """``segflow server --port P`` started as a user starts it, stopped with Ctrl-C (SIGINT)."""

    def __init__(self, home: Path, port: int, *args: str, **env: str):
        self.api, self.log = f"http://127.0.0.1:{port}/api", home / f"segflow-server-{time.monotonic_ns()}.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [str(BIN / "segflow"), "--root", str(ROOT), "server", "--port", str(port), *args],
                env=stage_env(PREFECT_HOME=str(home), PREFECT_API_URL="", **env),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 120
        while not healthy(self.api):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"segflow server did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.5)

    def stop(self) -> int:
        """Ctrl-C; the exit status. Fails (after killing them) if segflow or the Prefect server under it lingers."""
        from segflow.ops.leash import stop_group

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            code = None
        lingering = _members(self.proc.pid)
        stop_group(self.proc.pid, grace=2)
        self.proc.wait()
        assert code is not None, "segflow server did not stop on Ctrl-C (SIGINT) within 30 s"
        assert not lingering, f"processes {lingering} of segflow server outlived its Ctrl-C"
        return code


def _members(pgid: int, wait: float = 10) -> list[int]:
    from segflow.ops.leash import group_members

    deadline = time.monotonic() + wait
    while group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return group_members(pgid)


def _run_deployment(api: str, deployment_id: str, parameters: dict, timeout: float = 180) -> dict:
    run = httpx.post(
        f"{api}/deployments/{deployment_id}/create_flow_run", json={"parameters": parameters}, timeout=10
    ).json()
    deadline = time.monotonic() + timeout
    while run["state_type"] not in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
        assert time.monotonic() < deadline, f"flow run stuck in {run['state_type']}"
        time.sleep(0.5)
        run = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()
    return run


def _logs(api: str, run_id: str) -> list[dict]:
    """The run's logs once its last line (sent after its final state) has arrived."""
    deadline = time.monotonic() + 20
    while True:
        logs = run_children(api, run_id, "logs")
        done = any(log["message"].startswith("Finished in state") and not log["task_run_id"] for log in logs)
        if done or time.monotonic() > deadline:
            return logs
        time.sleep(0.5)


def test_a_team_url_becomes_the_driver_prefect_needs_and_never_shows_its_password():
    assert database_url("postgresql://a:pw@db:5432/p") == "postgresql+asyncpg://a:pw@db:5432/p"
    assert database_url("postgres://a@db/p") == "postgresql+asyncpg://a@db/p"
    assert database_url("postgresql+asyncpg://a@db/p") == "postgresql+asyncpg://a@db/p"
    assert database_url("sqlite:////srv/prefect.db") == "sqlite+aiosqlite:////srv/prefect.db"
    assert mask_password("postgresql://a:p@ss/w:rd@db:5432/p") == "postgresql://a:***@db:5432/p"
    assert mask_password("postgresql://a@db/p") == "postgresql://a@db/p"
    for bad in ("mysql://a:hunter2@db/p", "postgresql://a:hunter2@db:99999/p", "db:5432"):
        with pytest.raises(SegflowError) as error:
            database_url(bad)
        assert "hunter2" not in str(error.value)
        assert "postgresql://USER" in str(error.value) or "give a number from 1 to 65535" in str(error.value)
    # --database wins; else Prefect's variable under either of its names; else SQLite (None).
    env = {"PREFECT_API_DATABASE_CONNECTION_URL": "postgresql://a@old/p"}
    assert server_database(None, env) == "postgresql+asyncpg://a@old/p"
    assert server_database("postgresql://a@flag/p", env) == "postgresql+asyncpg://a@flag/p"
    assert server_database(None, {**env, "PREFECT_SERVER_DATABASE_CONNECTION_URL": "postgres://a@new/p"}).endswith(
        "@new/p"
    )
    assert server_database(None, {}) is None
    served = server_env(Path("/tmp/h"), 4200, database="postgresql://a@db/p")
    assert served["PREFECT_API_DATABASE_CONNECTION_URL"] == served["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    assert served["PREFECT_API_DATABASE_CONNECTION_URL"] == "postgresql+asyncpg://a@db/p"


def test_an_unreachable_database_is_one_line_naming_it_and_the_fix():
    port = free_port()  # nothing listens there
    proc = _segflow("server", "--database", f"postgresql://segflow:hunter2@127.0.0.1:{port}/segflow")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert f"cannot reach the database postgresql+asyncpg://segflow:***@127.0.0.1:{port}/segflow" in proc.stderr
    assert f"start PostgreSQL on 127.0.0.1:{port}" in proc.stderr and "hunter2" not in proc.stderr


def test_a_wrong_password_a_missing_database_or_no_right_to_create_tables_is_one_line(postgres):
    wrong = postgres.url.replace(quote(PASSWORD, safe=""), "hunter2")
    cases = {
        wrong: "refused user 'segflow': password authentication failed",
        postgres.url.removesuffix("/segflow") + "/nosuch": (
            f"database 'nosuch' does not exist on 127.0.0.1:{postgres.port}"
        ),
        postgres.url.removesuffix("/segflow") + "/locked": "ALTER DATABASE locked OWNER TO segflow",
    }
    for url, expected in cases.items():
        # In-process (the command's one-line printing is checked above): a second each, not three.
        with pytest.raises(SegflowError) as error:
            check_database(database_url(url))
        message = str(error.value)
        assert expected in message and "\n" not in message, message
        assert "hunter2" not in message and PASSWORD not in message and quote(PASSWORD, safe="") not in message
    check_database(database_url(postgres.url))  # the right one passes


def test_the_history_of_a_deployment_run_survives_a_restart_of_the_server_on_postgres(postgres, tmp_path):
    home, port = tmp_path / "server-home", free_port()
    home.mkdir()
    api = f"http://127.0.0.1:{port}/api"
    server = _Server(home, port, "--database", postgres.url)
    worker = None
    try:
        announced = server.log.read_text()
        assert f"(database postgresql+asyncpg://segflow:***@127.0.0.1:{postgres.port}/segflow)" in announced
        project = fresh_project(tmp_path / "project", TINY)
        # The worker first, as on a team's GPU machine: it waits for the deployment's runs.
        worker_log = (tmp_path / "worker.log").open("w")
        worker = subprocess.Popen(
            [str(BIN / "segflow"), "worker"],
            cwd=project,
            env=stage_env(PREFECT_API_URL=api, PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_WORKER_PREFETCH_SECONDS="1"),
            stdout=worker_log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deploy = _segflow("deploy", cwd=project, PREFECT_API_URL=api)
        assert deploy.returncode == 0, deploy.stdout + deploy.stderr
        (deployment,) = httpx.post(
            f"{api}/deployments/filter", json={"deployments": {"name": {"any_": ["retrain"]}}}, timeout=10
        ).json()
        # One stage keeps the test short; it is still the scheduled deployment, through a real worker.
        run = _run_deployment(api, deployment["id"], {"stages": ["ingest"], "register": False, "commit": False})
        assert run["state_type"] == "COMPLETED", (run["state"]["message"], (tmp_path / "worker.log").read_text())
        logs = _logs(api, run["id"])
        lines = [log["message"] for log in logs]
        assert any(line.startswith("Running stage") and "ingest" in line for line in lines), lines
        states = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run["id"]}, timeout=10).json()
    finally:
        if worker is not None:
            os.killpg(worker.pid, signal.SIGINT)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
            worker_log.close()
        stopped = server.stop()
    assert stopped == 0, server.log.read_text()[-2000:]
    assert not _members(worker.pid, wait=5), "the worker's processes outlived its Ctrl-C"
    said = server.log.read_text()
    assert PASSWORD not in said and quote(PASSWORD, safe="") not in said, "the password was printed"

    # It all went to PostgreSQL: Prefect's tables hold the run, and no SQLite database appeared in the home.
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))
    (row,) = postgres.query(f"SELECT state_type::text AS state FROM flow_run WHERE id = '{run['id']}'")
    assert row["state"] == "COMPLETED"

    # The same history from a fresh server process, given the database by Prefect's own variable this time.
    server = _Server(home, port, PREFECT_API_DATABASE_CONNECTION_URL=postgres.url)
    try:
        again = httpx.get(f"{api}/flow_runs/{run['id']}", timeout=10).json()
        assert again["state_type"] == "COMPLETED" and again["deployment_id"] == deployment["id"]
        assert again["parameters"]["stages"] == ["ingest"]
        states_again = httpx.get(f"{api}/flow_run_states/", params={"flow_run_id": run["id"]}, timeout=10).json()
        assert [s["type"] for s in states_again] == [s["type"] for s in states]
        assert [s["type"] for s in states_again][-1] == "COMPLETED" and len(states_again) >= 3
        logs_again = run_children(api, run["id"], "logs")
        assert sorted(log["id"] for log in logs_again) == sorted(log["id"] for log in logs)
        assert httpx.get(f"{api}/deployments/{deployment['id']}", timeout=10).json()["name"] == "retrain"
    finally:
        server.stop()
