"""The project's Prefect home and server: ``segflow server``, and how the other commands find it.

:func:`serve` runs ``prefect server start`` on 127.0.0.1 with what this stack needs (no telemetry,
the UI told the right API port, the project's own PREFECT_HOME), recorded in
``.segflow/prefect/server.json`` so the other commands find it without ``PREFECT_API_URL``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from pathlib import Path

from segflow.errors import SegflowError
from segflow.proc import is_alive, process_identity
from segflow.stage import STATE_DIR


def prefect_home(root: Path) -> Path:
    """The Prefect home segflow uses: ``PREFECT_HOME`` when set, else the project's ``.segflow/prefect``."""
    return Path(os.environ.get("PREFECT_HOME") or Path(root) / STATE_DIR / "prefect")


def _server_file(root: Path) -> Path:
    return prefect_home(root) / "server.json"


def find_api(root: Path) -> str | None:
    """The Prefect API to use: ``PREFECT_API_URL``, else the project's running ``segflow server``."""
    from segflow.ops.server import healthy

    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    with contextlib.suppress(OSError, ValueError, KeyError):
        info = json.loads(_server_file(root).read_text())
        if is_alive(info["process"]) and healthy(info["api"]):
            return info["api"]
    return None


def require_api(root: Path) -> str:
    """:func:`find_api`, or a one-line error saying how to get a server.

    Raises:
        SegflowError: no server.
    """
    api = find_api(root)
    if api is None:
        raise SegflowError(
            "no Prefect server: start one with `segflow server` (in another terminal) and "
            "export PREFECT_API_URL=http://127.0.0.1:4200/api, or point PREFECT_API_URL at your team's server"
        )
    return api


def serve(root: Path, port: int = 4200, announce=print, database: str | None = None) -> int:
    """Run a Prefect server (API and dashboard) on 127.0.0.1:``port`` until interrupted; return its status.

    Args:
        database: the server's database URL (see :func:`segflow.ops.server.server_env`; default SQLite
            in the Prefect home, or what Prefect's database variable names).

    The server runs on a leash (segflow/ops/leash.py): if this process is killed, even by SIGKILL, the
    server stops too instead of holding the port and the database.
    """
    import sys

    from segflow.ops.database import mask_password, server_database
    from segflow.ops.server import healthy, server_command, server_env

    home = prefect_home(root)
    home.mkdir(parents=True, exist_ok=True)
    api = f"http://127.0.0.1:{port}/api"
    if healthy(api):
        raise SegflowError(f"a Prefect server already answers on port {port}; use it (export PREFECT_API_URL={api})")
    leash = [sys.executable, "-m", "segflow.ops.leash", process_identity(), "--grace", "10", "--"]
    env = server_env(home, port, ui=True, database=database)
    server = subprocess.Popen([*leash, *server_command(port)], env=env, cwd=root)
    _server_file(root).write_text(json.dumps({"api": api, "process": process_identity(server.pid)}))
    url = database or server_database()
    where = f"database {mask_password(url)}" if url else f"database in {home}"
    announce(
        f"segflow: Prefect server for {root} ({where})\n"
        f"  dashboard:  http://127.0.0.1:{port}\n"
        f"  in other terminals: export PREFECT_API_URL={api}\n"
        f"  (segflow run / deploy / worker in this project find it without that)\n"
        f"  stop it with Ctrl-C"
    )
    try:
        return server.wait()
    except KeyboardInterrupt:
        server.send_signal(signal.SIGINT)
        return server.wait()
    finally:
        _server_file(root).unlink(missing_ok=True)
