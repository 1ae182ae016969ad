"""The cutover flag: guards, force and its audit, backward moves, the kill switch."""

from __future__ import annotations

import psycopg
import pytest

from cdc import cutover
from cdc import stage as stage_mod
from cdc.errors import (
    GuardRefusedError,
    InvalidStageError,
    ReasonRequiredError,
    StageRefusedError,
)
from cdc.stage import Stage
from tests.cutover_helpers import (
    PG,
    backfill,
    bring_to,
    engine_for,
    move,
    record_verify,
    service,
    tq,
)

T = "user_1"


def _audits(conn: PG) -> list[tuple[object, ...]]:
    return conn.execute(
        "SELECT tenant, from_stage, to_stage, changed_by, reason, forced "
        "FROM imgmig.stage_audit ORDER BY id"
    ).fetchall()


def _change(conn: PG, target: str, **kw: object) -> cutover.Transition:
    with conn.transaction():
        return cutover.change_stage(conn, T, target, reason="because", actor="ops", **kw)  # type: ignore[arg-type]


def test_unknown_stage_is_a_typed_error(conn: PG) -> None:
    """An unknown stage name raises InvalidStageError and changes nothing."""
    with pytest.raises(InvalidStageError, match="tabel"):
        _change(conn, "tabel")
    assert stage_mod.get(conn, T).stage is Stage.JSONB
    assert _audits(conn) == []


def test_reason_is_required(conn: PG) -> None:
    """A stage change without a reason is refused: every change is audited with one."""
    with pytest.raises(ReasonRequiredError), conn.transaction():
        cutover.change_stage(conn, T, Stage.DUAL_WRITE, reason="  ")
    assert _audits(conn) == []


def test_skipping_a_stage_is_refused_without_force(conn: PG) -> None:
    """jsonb -> shadow_read skips dual_write: refused, nothing written."""
    with pytest.raises(GuardRefusedError) as info:
        _change(conn, "shadow_read")
    assert any("skips dual_write" in r for r in info.value.reasons)
    assert stage_mod.get(conn, T).stage is Stage.JSONB
    assert _audits(conn) == []


def test_one_step_forward_to_dual_write_needs_no_evidence(conn: PG) -> None:
    """jsonb -> dual_write is allowed and audited with who, from, to and why."""
    moved = _change(conn, "dual_write")
    assert (moved.from_stage, moved.to_stage, moved.forced) == (
        Stage.JSONB,
        Stage.DUAL_WRITE,
        False,
    )
    assert _audits(conn) == [(T, "jsonb", "dual_write", "ops", "because", False)]


def test_dual_write_needs_the_expand_migration_finished(conn: PG) -> None:
    """A `migrate upgrade` interrupted after 0001 leaves the stage row without the event
    log: capture would fail every write (kept, but not captured). Refused until it is
    run again."""
    conn.execute(f"UPDATE {T}.alembic_version SET version_num = '0001_expand'")
    with pytest.raises(GuardRefusedError, match="expand migration has not finished"):
        _change(conn, "dual_write")
    assert stage_mod.get(conn, T).stage is Stage.JSONB


def test_shadow_read_needs_completed_backfill_and_clean_verify(conn: PG) -> None:
    """shadow_read is refused until the backfill is done and the latest verify is clean."""
    move(conn, T, Stage.DUAL_WRITE)
    with pytest.raises(GuardRefusedError) as info:
        _change(conn, "shadow_read")
    assert "the backfill has not completed" in info.value.reasons
    assert "no verify run recorded" in info.value.reasons
    backfill(conn, T)
    record_verify(conn, T, drift=3)
    with pytest.raises(GuardRefusedError, match="3 drifted products"):
        _change(conn, "shadow_read")
    record_verify(conn, T, finished=False)
    with pytest.raises(GuardRefusedError, match="has not finished"):
        _change(conn, "shadow_read")
    record_verify(conn, T)
    assert _change(conn, "shadow_read").to_stage is Stage.SHADOW_READ


def test_a_return_to_jsonb_voids_the_backfill_and_the_verify_before_it(conn: PG) -> None:
    """Capture was off while back at jsonb, so legacy writes reached only the JSONB:
    shadow_read needs a backfill and a verify from after that return, not before it."""
    move(conn, T, Stage.DUAL_WRITE)
    backfill(conn, T)
    record_verify(conn, T)
    move(conn, T, Stage.JSONB)
    move(conn, T, Stage.DUAL_WRITE)
    with pytest.raises(GuardRefusedError) as info:
        _change(conn, "shadow_read")
    assert "the backfill has not completed" in info.value.reasons
    assert any("older than the tenant's last return" in r for r in info.value.reasons)
    backfill(conn, T)
    record_verify(conn, T)
    assert _change(conn, "shadow_read").to_stage is Stage.SHADOW_READ


def test_table_needs_shadow_reads_without_mismatches(conn: PG, migrated_url: str) -> None:
    """table is refused with no shadow reads, or with a mismatch; allowed after clean reads."""
    bring_to(conn, T, Stage.SHADOW_READ)
    record_verify(conn, T)
    with pytest.raises(GuardRefusedError, match="no shadow reads"):
        _change(conn, "table")
    with engine_for(migrated_url) as engine:
        for product_id in (1, 2, 3):
            with service(engine, T) as svc:
                svc.list_images(product_id)
        assert _change(conn, "table").to_stage is Stage.TABLE
        move(conn, T, Stage.SHADOW_READ)  # back, and a new shadow period
        conn.execute(tq("DELETE FROM {images} WHERE product_id = 4", T))
        with service(engine, T) as svc:
            svc.list_images(4)
    with pytest.raises(GuardRefusedError, match="1 shadow mismatches"):
        _change(conn, "table")


def test_force_overrides_a_guard_and_is_audited(conn: PG) -> None:
    """--force moves past the guards; the audit says forced, why, and what was overridden."""
    moved = _change(conn, "table", force=True)
    assert moved.forced
    assert moved.to_stage is Stage.TABLE
    (row,) = _audits(conn)
    assert row[:4] == (T, "jsonb", "table", "ops")
    assert row[5] is True
    assert str(row[4]).startswith("because [forced past: skips dual_write, shadow_read")


def test_going_back_is_one_flip_down_to_dual_write(conn: PG) -> None:
    """table -> dual_write needs no evidence; back to jsonb needs --force."""
    move(conn, T, Stage.TABLE)
    assert _change(conn, "dual_write").to_stage is Stage.DUAL_WRITE
    with pytest.raises(GuardRefusedError, match="going back to jsonb"):
        _change(conn, "jsonb")
    assert _change(conn, "jsonb", force=True).to_stage is Stage.JSONB


def test_leaving_contracted_needs_the_jsonb_column(conn: PG) -> None:
    """Without products.images, no flag (not even --force) leaves contracted."""
    move(conn, T, Stage.CONTRACTED)
    with pytest.raises(GuardRefusedError, match="leaving contracted"):
        _change(conn, "table")
    conn.execute(tq("ALTER TABLE {products} DROP COLUMN images", T))
    with pytest.raises(StageRefusedError, match="Alembic downgrade"):
        _change(conn, "table", force=True)
    assert stage_mod.get(conn, T).stage is Stage.CONTRACTED


def test_setting_several_tenants_is_all_or_nothing(conn: PG) -> None:
    """When one tenant's guard refuses, no tenant moves."""
    move(conn, "user_2", Stage.DUAL_WRITE)
    backfill(conn, "user_2")
    record_verify(conn, "user_2")
    with pytest.raises(GuardRefusedError, match="user_1"):
        cutover.change_stages(conn, ["user_2", "user_1"], Stage.SHADOW_READ, reason="r")
    assert stage_mod.get(conn, "user_2").stage is Stage.DUAL_WRITE
    assert stage_mod.get(conn, "user_1").stage is Stage.JSONB
    assert len(_audits(conn)) == 1


def test_kill_switch_sends_each_tenant_to_the_safest_full_stage(conn: PG) -> None:
    """table and shadow_read go to dual_write; jsonb and dual_write stay; contracted stays."""
    move(conn, "user_1", Stage.TABLE)
    move(conn, "user_2", Stage.SHADOW_READ)
    move(conn, "user_4", Stage.CONTRACTED)
    moves = {m.tenant: m for m in cutover.kill_switch(conn, reason="pager", actor="ops")}
    stages = {s.tenant: s.stage for s in stage_mod.get_all(conn)}
    assert stages == {
        "user_1": Stage.DUAL_WRITE,
        "user_2": Stage.DUAL_WRITE,
        "user_4": Stage.CONTRACTED,
        "user_5": Stage.JSONB,
        "template_tenant": Stage.JSONB,
    }
    assert "stays contracted" in moves["user_4"].note
    last = conn.execute(
        "SELECT reason, changed_by FROM imgmig.stage_audit ORDER BY id DESC LIMIT 1"
    ).fetchone()
    assert last == ("kill switch: pager", "ops")


def test_kill_switch_moves_the_others_when_one_tenant_is_stuck(conn: PG, migrated_url: str) -> None:
    """A tenant stuck on a lock is reported and kept; the kill switch moves the others."""
    move(conn, "user_1", Stage.TABLE)
    move(conn, "user_2", Stage.TABLE)
    with psycopg.connect(migrated_url) as blocker:
        blocker.execute("LOCK TABLE user_2.product_images IN ACCESS EXCLUSIVE MODE")
        moves = {m.tenant: m for m in cutover.kill_switch(conn, reason="pager", actor="ops")}
        blocker.rollback()
    assert moves["user_1"].to_stage is Stage.DUAL_WRITE
    assert moves["user_2"].error is not None
    assert "lock_timeout" in moves["user_2"].error
    assert stage_mod.get(conn, "user_1").stage is Stage.DUAL_WRITE
    assert stage_mod.get(conn, "user_2").stage is Stage.TABLE


def test_contracted_is_left_to_the_contract_migration(conn: PG) -> None:
    """flag set contracted is refused while products.images still exists."""
    move(conn, T, Stage.TABLE)
    record_verify(conn, T)
    with pytest.raises(GuardRefusedError, match="contract migration sets contracted"):
        _change(conn, "contracted")
    assert stage_mod.get(conn, T).stage is Stage.TABLE
