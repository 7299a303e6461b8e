"""The Prefect server's database: SQLite in its home by default, or a team's PostgreSQL.

A team points ``segflow server --database postgresql://user:password@host:5432/db`` (or Prefect's own
``PREFECT_API_DATABASE_CONNECTION_URL``) at one PostgreSQL, so every machine's runs land in one history
that outlives the server process. Prefect's server needs the async driver (``postgresql+asyncpg://``);
the plain form people copy from ``psql`` is turned into it here. The database is tried before the server
starts: Prefect itself answers a wrong password with a 200-line traceback after ten seconds of start-up.
Passwords never reach a message: every URL shown goes through :func:`mask_password`.
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from segflow.errors import SegflowError

#: Prefect's setting, under its current name and the documented older one; the first one set wins.
DATABASE_VARIABLES = ("PREFECT_SERVER_DATABASE_CONNECTION_URL", "PREFECT_API_DATABASE_CONNECTION_URL")

#: URL schemes accepted, and the SQLAlchemy driver Prefect's server needs for each.
_DRIVERS = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "postgresql+asyncpg": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
    "sqlite+aiosqlite": "sqlite+aiosqlite",
}


def mask_password(url: str) -> str:
    """``url`` with its password replaced by ``***``, safe to print.

    Everything up to the last ``@`` counts as user and password, so a password with an unescaped ``@``,
    ``/`` or ``:`` is hidden too.
    """
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    userinfo, _, host = rest.rpartition("@")
    user, colon, _ = userinfo.partition(":")
    return f"{scheme}://{user}{':***' if colon else ''}@{host}"


def database_url(url: str) -> str:
    """The form of ``url`` Prefect's server takes: ``postgresql://`` becomes ``postgresql+asyncpg://``.

    Raises:
        SegflowError: not a PostgreSQL or SQLite URL.
    """
    scheme, sep, rest = url.strip().partition("://")
    driver = _DRIVERS.get(scheme.lower()) if sep else None
    if driver is None:
        raise SegflowError(
            f"database URL {mask_password(url)!r} is not PostgreSQL or SQLite; "
            "give postgresql://USER:PASSWORD@HOST:5432/DATABASE"
        )
    port = _port(rest)
    if driver.startswith("postgresql") and not (port.isdigit() and 0 < int(port) < 65536):
        raise SegflowError(f"database URL {mask_password(url)!r} has port {port!r}; give a number from 1 to 65535")
    return f"{driver}://{rest}"


def server_database(flag: str | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """The database the server should use: ``--database``, else Prefect's own variable, in Prefect's form.

    Returns:
        None for the default (SQLite in the server's PREFECT_HOME).
    """
    environ = os.environ if environ is None else environ
    url = flag or next((environ[name] for name in DATABASE_VARIABLES if environ.get(name)), None)
    return database_url(url) if url else None


def check_database(url: str, timeout: float = 10) -> None:
    """Connect to a PostgreSQL ``url`` as Prefect will, and check Prefect can create its tables there.

    A SQLite URL passes unchecked (Prefect creates the file).

    Raises:
        SegflowError: one line naming the masked URL, what is wrong and what to do.
    """
    if not url.startswith("postgresql"):
        return
    import asyncio

    asyncio.run(_check_postgres(url, timeout))


async def _check_postgres(url: str, timeout: float) -> None:
    import asyncpg

    shown = mask_password(url)
    parts = urlsplit(url)
    user = unquote(parts.username or "") or getpass.getuser()  # asyncpg's default, as psql's
    name = unquote(parts.path.lstrip("/")) or user
    host, port = parts.hostname or "localhost", _port(url.partition("://")[2])
    where = f"{host}:{port}"
    try:
        connection = await asyncpg.connect(dsn="postgresql" + url[url.index("://") :], timeout=timeout)
    except asyncpg.InvalidCatalogNameError:
        raise SegflowError(
            f"database {name!r} does not exist on {where} ({shown}); create it once: "
            f"createdb -h {host} -p {port} -U {user} -O {user} {name}"
        ) from None
    except asyncpg.InvalidAuthorizationSpecificationError as error:
        raise SegflowError(
            f"the database {shown} refused user {user!r}: {_scrub(str(error), url)}; "
            "check the user and password in the URL (psql with the same URL must log in)"
        ) from None
    except asyncpg.PostgresError as error:
        raise SegflowError(f"the database {shown} refused the connection: {_scrub(str(error), url)}") from None
    except (OSError, TimeoutError, ValueError, OverflowError) as error:
        reason = _scrub(str(error), url) or f"no answer within {timeout:g} s"
        raise SegflowError(
            f"cannot reach the database {shown}: {reason}; start PostgreSQL on {where} "
            "or fix the host and port in --database / PREFECT_API_DATABASE_CONNECTION_URL"
        ) from None
    try:
        creates, trigrams = await connection.fetchrow(
            "SELECT has_schema_privilege('public', 'CREATE'), "
            "EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'pg_trgm')"
        )
    finally:
        await connection.close()
    if not creates:
        # PostgreSQL 15 took CREATE on schema public away from everyone but the database's owner.
        raise SegflowError(
            f"user {user!r} cannot create Prefect's tables in database {name!r} ({shown}); "
            f"make it the owner: psql -c 'ALTER DATABASE {name} OWNER TO {user}' (as a superuser)"
        )
    if not trigrams:
        raise SegflowError(
            f"PostgreSQL on {where} lacks the pg_trgm extension Prefect's tables use ({shown}); "
            "install PostgreSQL's contrib package there (Debian: postgresql-contrib)"
        )


def _port(rest: str) -> str:
    """The port written in a URL after its ``://`` (5432 when none), without urllib's ValueError for a bad one."""
    host = rest.rpartition("@")[2].partition("/")[0].partition("?")[0].rpartition("]")[2]  # after an IPv6 literal
    return host.rpartition(":")[2] if ":" in host else "5432"


def _scrub(text: str, url: str) -> str:
    """``text`` with the URL's password (as written and decoded) replaced, in case a driver echoes it."""
    password = urlsplit(url).password if "@" in url else None
    for secret in {password, unquote(password or "")} - {None, ""}:
        text = text.replace(secret, "***")
    return text.strip().splitlines()[0] if text.strip() else ""
