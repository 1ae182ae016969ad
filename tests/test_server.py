"""Choosing and running a real PostgreSQL."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import psycopg
import pytest
from psycopg.conninfo import make_conninfo

from cdc import db, server
from cdc.errors import DatabaseUnreachableError
from services.db import make_engine, tenant_session
from services.models import Product, ProductImage


def test_sqlalchemy_url_keeps_socket_and_tcp_hosts() -> None:
    """libpq URLs become psycopg-3 SQLAlchemy URLs, for unix sockets and TCP alike."""
    socket_url = server.sqlalchemy_url("postgresql://postgres:@/postgres?host=/run/pg/d")
    assert socket_url.startswith("postgresql+psycopg://postgres@/postgres?host=")
    assert "%2Frun%2Fpg%2Fd" in socket_url or "/run/pg/d" in socket_url
    tcp_url = server.sqlalchemy_url("postgresql://u:p@db.example:6543/app")
    assert tcp_url == "postgresql+psycopg://u:p@db.example:6543/app"


def test_redact_hides_passwords() -> None:
    """A password never reaches an error message."""
    assert "s3cret" not in server.redact("postgresql://u:s3cret@h/db")


def test_unreachable_url_is_a_typed_error() -> None:
    """check_reachable raises DatabaseUnreachableError with the reason."""
    with pytest.raises(DatabaseUnreachableError, match="cannot reach PostgreSQL"):
        server.check_reachable("postgresql://nobody@127.0.0.1:1/none", timeout_s=2)


def test_docker_ping_answers_false_without_an_engine(tmp_path: Path) -> None:
    """No engine behind DOCKER_HOST means no testcontainers, quickly and without leaks."""
    old = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = f"unix://{tmp_path}/nothing.sock"
    try:
        assert server.docker_available() is False
    finally:
        if old is None:
            del os.environ["DOCKER_HOST"]
        else:
            os.environ["DOCKER_HOST"] = old


def test_session_server_is_real_postgresql(pg: server.Server) -> None:
    """The session's server answers SQL and reports a supported major version."""
    major = int(server.check_reachable(pg.url).split(".")[0])
    assert major >= 15


def test_models_follow_the_tenant(migrated_url: str) -> None:
    """The same models read different tenant schemas through schema_translate_map."""
    engine = make_engine(migrated_url)
    try:
        counts = {}
        for tenant in ("user_1", "user_5"):
            with tenant_session(engine, tenant) as session:
                counts[tenant] = session.query(Product).count()
                session.add(ProductImage(product_id=1, url="https://x/y.jpg", order=0))
                session.flush()
                assert session.query(ProductImage).count() == 1
                session.rollback()
    finally:
        engine.dispose()
    with psycopg.connect(migrated_url) as conn:
        real = {t: conn.execute(f"SELECT count(*) FROM {t}.products").fetchone() for t in counts}
    assert counts == {t: r[0] for t, r in real.items() if r}
    assert counts["user_1"] != counts["user_5"]


@pytest.mark.slow
def test_orphaned_embedded_server_is_stopped() -> None:
    """A server whose owning process was SIGKILLed is stopped by the next session."""
    base = Path(tempfile.mkdtemp(prefix=server.TEST_DIR_PREFIX, dir="/tmp"))
    try:
        owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        (base / "owner.pid").write_text(str(owner.pid))
        srv, _handle = server.start_embedded(base / "d", keep_running=True)
        with psycopg.connect(srv.url) as conn:
            conn.execute("SELECT 1")
        owner.kill()
        owner.wait()
        assert server.kill_orphans() >= 1
        deadline = time.monotonic() + 30
        pgdata = str(base / "d")
        while time.monotonic() < deadline:
            alive = [
                p for p in psutil.process_iter(attrs=["name", "cmdline"])
                if p.info["name"] == "postgres" and pgdata in " ".join(p.info["cmdline"] or [])
            ]  # fmt: skip
            if not alive:
                break
            time.sleep(0.2)
        assert not alive
    finally:
        shutil.rmtree(base, ignore_errors=True)  # the stopped server's files


def test_batch_connections_run_without_jit_and_keep_the_urls_options(
    database_url: str,
) -> None:
    """Backfill/reconcile workers turn JIT off and flush their writes as they go, on top of
    options the URL already sets; other connections keep the server's settings."""
    with_options = make_conninfo(database_url, options="-c work_mem=7MB")
    names = ("jit", "work_mem", "backend_flush_after")
    with db.connect(with_options, batch=True) as conn:
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        jit, work_mem, flush = (conn.execute(f"SHOW {name}").fetchone() for name in names)
        assert jit == ("off",)
        assert work_mem == ("7MB",)
        assert flush == (db.BATCH_FLUSH_AFTER,)
        source = "SELECT source FROM pg_settings WHERE name = 'backend_flush_after'"
        assert conn.execute(source).fetchone() == ("session",)
    with db.connect(database_url) as conn:
        assert conn.execute(source).fetchone() != ("session",)
