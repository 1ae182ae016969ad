"""``imgmig flag set|get|kill-switch`` as an operator runs them: exit codes and audit."""

from __future__ import annotations

import subprocess
import sys

from cdc import stage as stage_mod
from cdc.stage import Stage
from services import api_keys
from tests.cutover_helpers import PG


def imgmig(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "cdc", "--log-format", "json", "--database-url", url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


def test_guard_refusal_is_one_line_and_exit_8(conn: PG, migrated_url: str) -> None:
    """A step that skips a guard exits 8 with one line naming the guard; nothing moves."""
    result = imgmig(migrated_url, "flag", "set", "shadow_read", "-t", "user_1", "--reason", "go")
    assert result.returncode == 8
    (line,) = result.stderr.strip().splitlines()
    assert "refusing jsonb -> shadow_read" in line
    assert "skips dual_write" in line
    assert stage_mod.get(conn, "user_1").stage is Stage.JSONB


def test_unknown_stage_and_missing_tenant_are_exit_4(migrated_url: str) -> None:
    """An unknown stage name, or not exactly one of --tenant and --all, exits 4."""
    bad = imgmig(migrated_url, "flag", "set", "tabel", "-t", "user_1", "--reason", "go")
    assert bad.returncode == 4
    assert "unknown stage 'tabel'" in bad.stderr
    nobody = imgmig(migrated_url, "flag", "set", "dual_write", "--reason", "go")
    assert nobody.returncode == 4
    assert "--all" in nobody.stderr
    both = imgmig(
        migrated_url, "flag", "set", "dual_write", "-t", "user_1", "--all", "--reason", "x"
    )
    assert both.returncode == 4


def test_force_all_then_kill_switch(conn: PG, migrated_url: str) -> None:
    """--force --all moves every tenant and audits forced; kill-switch brings them back."""
    forced = imgmig(migrated_url, "flag", "set", "table", "--all", "--reason", "drill", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "user_5: jsonb -> table" in forced.stdout
    audit = conn.execute(
        "SELECT count(*), bool_and(forced) FROM imgmig.stage_audit WHERE to_stage = 'table'"
    ).fetchone()
    assert audit == (5, True)
    killed = imgmig(migrated_url, "flag", "kill-switch", "--reason", "pager")
    assert killed.returncode == 0, killed.stderr
    assert "user_1: table -> dual_write" in killed.stdout
    assert {s.stage for s in stage_mod.get_all(conn)} == {Stage.DUAL_WRITE}
    shown = imgmig(migrated_url, "flag", "get", "-t", "user_1")
    assert "dual_write" in shown.stdout
    assert "pager" in shown.stdout  # the audited reason (the table may wrap it)


def test_api_key_create_prints_a_key_and_stores_its_hash(conn: PG, migrated_url: str) -> None:
    """api-key create prints the key once; only its SHA-256 is stored; unknown tenant: 4."""
    made = imgmig(migrated_url, "api-key", "create", "--tenant", "user_4")
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip()
    stored = conn.execute("SELECT key_hash, tenant FROM imgmig.api_keys").fetchall()
    assert stored == [(api_keys.hash_key(key), "user_4")]
    assert key not in str(stored)
    unknown = imgmig(migrated_url, "api-key", "create", "--tenant", "user_3")
    assert unknown.returncode == 4
    assert "unknown tenant 'user_3'" in unknown.stderr
