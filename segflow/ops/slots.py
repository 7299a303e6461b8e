"""The ``gpu`` slot: a Prefect global concurrency lease, with a note in the project of who holds it.

A training stage holds one slot of the global concurrency limit ``gpu`` on
the Prefect server, as a *lease* that its flow process renews while it
trains. When that process dies without giving the slot back (the machine
lost power, the OOM killer took every process of the run), two things keep
the slot from staying taken for good:

- segflow's servers keep leases on disk (``PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE``
  set to Prefect's filesystem storage, :func:`segflow.ops.server.server_env`), so a lease outlives
  the server process and the server's repossessor frees it once it expires
  (:data:`LEASE_SECONDS` after the last renewal), even after a restart;
- each holder writes ``.segflow/gpu-leases/<lease id>.json`` (its process, flow
  run, server) beside the project. The next run in the project frees at once the
  leases whose holder is provably gone (same machine, process not alive) and says so.

A run that has to wait for the slot says for whom, every :data:`SAY_EVERY` seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx

from segflow.proc import is_alive, process_identity
from segflow.stage import STATE_DIR

GPU_LIMIT = "gpu"
#: Seconds a lease lasts without renewal (renewed by the holder well before that).
LEASE_SECONDS = 120.0
#: Seconds between "waiting for the gpu slot" lines.
SAY_EVERY = 30.0
LEASE_DIR = STATE_DIR / "gpu-leases"


def _records(root: Path) -> Iterator[tuple[Path, dict]]:
    for path in sorted((Path(root) / LEASE_DIR).glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            yield path, json.loads(path.read_text())


def _describe(record: dict) -> str:
    run = f"flow run {record['flow_run']}" if record.get("flow_run") else "a segflow run"
    return f"{run} (process {record['holder'].split(':')[0]} on {record['host']}, since {record['since']})"


def _lease_exists(api: str, lease: str) -> bool | None:
    """Whether the server still holds ``lease`` (renewing it tells; for the shortest term Prefect allows, a
    minute, and the lease is given back right after), or None if the server does not answer."""
    try:
        answer = httpx.post(f"{api}/v2/concurrency_limits/leases/{lease}/renew", json={"lease_duration": 60}, timeout=5)
    except httpx.HTTPError:
        return None
    if answer.status_code in (404, 410):
        return False
    return True if answer.status_code < 300 else None


def reclaim_dead(root: Path, api: str) -> list[str]:
    """Give back the gpu leases of this project whose holder process is gone; one line per lease freed.

    Only holders on this machine can be proven dead; records of live holders, and of other machines,
    are left (their leases expire on the server if those holders are gone too). A lease this server
    does not know (expired and freed already, or held on another server) only loses its note.
    """
    freed = []
    host = socket.gethostname()
    for path, record in _records(root):
        if record.get("host") != host or is_alive(record.get("holder", "")):
            continue
        exists = _lease_exists(api, record["lease"])
        if exists is None:
            continue
        if exists:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(
                    f"{api}/v2/concurrency_limits/decrement-with-lease", json={"lease_id": record["lease"]}, timeout=5
                ).raise_for_status()
                freed.append(f"reclaimed the gpu slot held by {_describe(record)}: that process is gone")
        with contextlib.suppress(OSError):
            path.unlink()
    return freed


def holders(root: Path) -> list[str]:
    """Who in this project holds a gpu slot now, as words."""
    return [_describe(record) for _, record in _records(root) if is_alive(record.get("holder", ""))]


def _limit(api: str) -> str:
    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        limit = httpx.get(f"{api}/v2/concurrency_limits/{GPU_LIMIT}", timeout=5).json()
        return f"{limit['active_slots']}/{limit['limit']} taken"
    return "state unknown"


@contextlib.contextmanager
def gpu_slot(root: Path, api: str, flow_run: str | None, say: Callable[[str], None]) -> Iterator[str]:
    """Hold a slot of the ``gpu`` limit (renewed while held) and a note of it in the project; yield the lease id.

    Prefect's own ``concurrency()`` does the same but keeps the lease id to itself; the stage's leash
    needs it to give the slot back at once if this process is killed.

    Args:
        say: called with each line worth telling the user (reclaimed slots, waiting for one).
    """
    from prefect.concurrency._asyncio import AcquireConcurrencySlotTimeoutError
    from prefect.concurrency._leases import maintain_concurrency_lease
    from prefect.concurrency._sync import acquire_concurrency_slots_with_lease, release_concurrency_slots_with_lease

    for line in reclaim_dead(root, api):
        say(line)
    waited = 0.0
    while True:
        try:
            acquired = acquire_concurrency_slots_with_lease(
                [GPU_LIMIT], 1, strict=True, lease_duration=LEASE_SECONDS, timeout_seconds=SAY_EVERY
            )
            break
        except AcquireConcurrencySlotTimeoutError:
            waited += SAY_EVERY
            here = holders(root)
            who = "; ".join(here) if here else "a run of another project or machine on this Prefect server"
            say(
                f"waiting {waited:.0f} s for the gpu slot ({_limit(api)}): held by {who} "
                f"(`prefect gcl inspect {GPU_LIMIT}` shows the limit; raise it for more GPUs)"
            )
            for line in reclaim_dead(root, api):
                say(line)
    lease = str(acquired.lease_id)
    note = Path(root) / LEASE_DIR / f"{lease}.json"
    record = {
        "lease": lease,
        "holder": process_identity(),
        "host": socket.gethostname(),
        "flow_run": flow_run,
        "api": api,
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    note.parent.mkdir(parents=True, exist_ok=True)
    tmp = note.with_name(f".{note.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record) + "\n")
    os.replace(tmp, note)
    try:
        with maintain_concurrency_lease(acquired.lease_id, LEASE_SECONDS, raise_on_lease_renewal_failure=False):
            yield lease
    finally:
        with contextlib.suppress(Exception):  # a gone server: the lease expires there, the note is reclaimed
            release_concurrency_slots_with_lease(acquired.lease_id)
            note.unlink(missing_ok=True)
