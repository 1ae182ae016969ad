"""The command line: one clear line and a documented exit code for known errors."""

from __future__ import annotations

import subprocess
import sys

import psycopg
import pytest

from cdc import cutover, migrate, project
from cdc.stage import Stage


def imgmig(*args: str, env_url: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m cdc`` as a user would."""
    cmd = [sys.executable, "-m", "cdc", "--log-format", "json"]
    if env_url:
        cmd += ["--database-url", env_url]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120, check=False)


def test_unreachable_database_is_one_line(tmp_path: object) -> None:
    """A URL nobody answers gives exit 3 and one line, no traceback."""
    result = imgmig("status", env_url="postgresql://nobody@127.0.0.1:1/none")
    assert result.returncode == 3
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("imgmig: error: cannot reach PostgreSQL")
    assert "Traceback" not in result.stderr


def test_debug_shows_the_traceback() -> None:
    """--debug trades the one line for the full traceback."""
    result = subprocess.run(
        [sys.executable, "-m", "cdc", "--debug", "--database-url",
         "postgresql://nobody@127.0.0.1:1/none", "status"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" in result.stderr
    assert "DatabaseUnreachableError" in result.stderr


def test_unknown_tenant_is_one_line(migrated_url: str) -> None:
    """An unknown tenant names the known ones and exits 4."""
    result = imgmig("flag", "get", "--tenant", "user_3", env_url=migrated_url)
    assert result.returncode == 4
    assert "unknown tenant 'user_3'" in result.stderr
    assert "user_1, user_2, user_4, user_5, template_tenant" in result.stderr
    assert "Traceback" not in result.stderr


def test_malformed_tenant_name_is_refused(migrated_url: str) -> None:
    """A tenant name outside the pattern never reaches SQL."""
    result = imgmig("status", "--tenant", "user_1; DROP TABLE x", env_url=migrated_url)
    assert result.returncode == 4
    assert "invalid tenant name" in result.stderr


def test_seed_status_and_migrate_commands(database_url: str) -> None:
    """seed → migrate upgrade → status show the tenants and their stage."""
    seeded = imgmig("seed", "--products", "80", "--labels", "8", env_url=database_url)
    assert seeded.returncode == 0, seeded.stderr
    assert "seeded 80 products in 5 tenants" in seeded.stdout
    again = imgmig("seed", "--products", "80", "--labels", "8", env_url=database_url)
    assert again.returncode == 6
    assert "--reset" in again.stderr
    upgraded = imgmig("migrate", "upgrade", "--tenant", "user_1", env_url=database_url)
    assert upgraded.returncode == 0, upgraded.stderr
    shown = imgmig("status", env_url=database_url)
    assert shown.returncode == 0, shown.stderr
    lines = {line.split()[1]: line for line in shown.stdout.splitlines() if "user_" in line}
    assert "jsonb" in lines["user_1"]
    assert "not migrated" in lines["user_2"]


def test_alembic_command_line_limits_to_one_tenant(seeded_url: str) -> None:
    """Plain `alembic -x tenant=… upgrade expand` works; an unknown tenant fails in one line."""
    alembic = [sys.executable, "-m", "alembic", "-c", str(migrate.ROOT / "alembic.ini")]
    ok = subprocess.run(
        [*alembic, "-x", f"url={seeded_url}", "-x", "tenant=user_5", "upgrade", "expand"],
        capture_output=True, text=True, timeout=120, check=False, cwd=migrate.ROOT,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [*alembic, "-x", f"url={seeded_url}", "-x", "tenant=user_9", "upgrade", "expand"],
        capture_output=True, text=True, timeout=120, check=False, cwd=migrate.ROOT,
    )  # fmt: skip
    assert bad.returncode != 0
    assert "FAILED: unknown tenant 'user_9'" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
    with psycopg.connect(seeded_url) as conn:
        rows = conn.execute(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'product_images'"
        ).fetchall()
    assert rows == [("user_5",)]


def test_flag_get_shows_deferred_projection_lag(migrated_url: str) -> None:
    """In deferred mode `flag get` shows the events the projector has not applied yet."""
    with psycopg.connect(migrated_url) as conn:
        cutover.change_stage(conn, "user_5", Stage.DUAL_WRITE, reason="test")
        project.set_mode(conn, "user_5", "deferred")
        conn.commit()
        conn.execute("UPDATE user_5.products SET images = '[]' WHERE id IN (1, 2)")
        conn.commit()
    shown = imgmig("flag", "get", "--tenant", "user_5", env_url=migrated_url)
    assert shown.returncode == 0, shown.stderr
    assert "deferred" in shown.stdout
    assert "2 events" in shown.stdout
    with psycopg.connect(migrated_url) as conn:
        project.project(conn, "user_5")
    again = imgmig("flag", "get", "--tenant", "user_5", env_url=migrated_url)
    assert "0 events" in again.stdout


@pytest.mark.parametrize(
    "args",
    [
        ("verify", "--no-such-flag"),
        ("reconcile", "--workers", "x"),
        ("no-such-command",),
        ("backfill", "--max-replica-lag", "lots"),
        ("backfill", "--fk-check", "sometimes"),
        ("deploy", "run", "--max-replica-lag", "-1"),
        ("migrate", "downgrade", "expand", "-x", "restore_batch_size"),
        ("migrate", "downgrade", "expand", "-x", "no_such_option=1"),
        ("migrate", "downgrade", "expand", "-x", "restore_batch_size=0"),
        ("migrate", "upgrade", "-x", "lock_timeout_ms=soon"),
    ],
)
def test_usage_errors_exit_64_never_a_cron_code(args: tuple[str, ...]) -> None:
    """A broken command line exits 64 (EX_USAGE), not 2, which reconcile uses for drift."""
    result = imgmig(*args)
    assert result.returncode == 64, result.stderr
    assert result.stderr.strip()
