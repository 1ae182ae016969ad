"""Contract: guarded, archived, reversible; the downgrade restores the JSONB exactly."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb
from structlog.testing import capture_logs

from cdc import backfill, capture, cutover, deploy, migrate, reconcile
from cdc import stage as stage_mod
from cdc.backfill import BackfillConfig
from cdc.contract import rebuild_jsonb, restore_archive
from cdc.demo import interrupt_restore
from cdc.deploy import DeployOptions
from cdc.errors import ContractRefusedError, DeployStoppedError, StageRefusedError
from cdc.progress import Silent
from cdc.stage import Stage
from cdc.tenants import discover

NOW = {"contract_min_table_age": "0"}


def to_table(url: str, tenants: list[str] | None = None) -> list[str]:
    """Walk tenants through dual_write → backfill → verify → shadow_read → table."""
    with psycopg.connect(url) as conn:
        names = tenants or discover(conn)
        cutover.change_stages(conn, names, Stage.DUAL_WRITE, reason="test")
        conn.commit()
    backfill.run(url, names, BackfillConfig(), Silent())
    assert all(o.exit_code == 0 for o in reconcile.run(url, names, mode="verify"))
    with psycopg.connect(url) as conn:
        cutover.change_stages(conn, names, Stage.SHADOW_READ, reason="test")
        cutover.change_stages(
            conn, names, Stage.TABLE, reason="test: no shadow traffic", force=True
        )
        conn.commit()
    return names


def stage_of(conn: psycopg.Connection[Any], tenant: str) -> Stage:
    return stage_mod.get(conn, tenant).stage


def images_by_product(url: str, tenants: list[str]) -> dict[tuple[str, int], Any]:
    with psycopg.connect(url) as conn:
        return {
            (t, int(r[0])): r[1]
            for t in tenants
            for r in conn.execute(f'SELECT id, images FROM "{t}".products')
        }


def test_contract_then_downgrade_restores_every_product_exactly(migrated_url: str) -> None:
    """JSONB after contract → downgrade equals JSONB before contract for 100% of products,
    metadata keys included; the stage returns to table with reverse sync working."""
    tenants = to_table(migrated_url)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        conn.execute(
            "UPDATE user_1.product_images SET alt_text = 'front', tags = '{a,b}', "
            "mime_type = 'image/jpeg', file_size = 1234, width = 800, height = 600 "
            'WHERE product_id = 1 AND "order" = 0'
        )
        conn.execute(
            "UPDATE user_1.product_images SET is_label = true "
            "WHERE id = (SELECT id FROM user_1.product_images WHERE product_id = 2 "
            'ORDER BY "order" DESC LIMIT 1)'
        )
    assert all(o.exit_code == 0 for o in reconcile.run(migrated_url, tenants, mode="verify"))
    before = images_by_product(migrated_url, tenants)
    first = before[("user_1", 1)][0]
    assert first["alt_text"] == "front"
    assert first["width"] == 800

    migrate.upgrade(migrated_url, revision=migrate.CONTRACT, options=NOW)
    with psycopg.connect(migrated_url) as conn:
        column = conn.execute(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_name = 'products' AND column_name = 'images'"
        ).fetchone()
        stages = {r[0] for r in conn.execute("SELECT stage FROM imgmig.tenant_state")}
        archived = conn.execute("SELECT count(*) FROM imgmig.images_archive").fetchone()
    assert column == (0,)
    assert stages == {"contracted"}
    assert archived == (len(before),)

    migrate.downgrade(migrated_url, migrate.EXPAND, options=NOW)
    after = images_by_product(migrated_url, tenants)
    diff = {k: (before[k], after.get(k)) for k in before if before[k] != after.get(k)}
    assert not diff, list(diff)[:5]
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        stages = {r[0] for r in conn.execute("SELECT stage FROM imgmig.tenant_state")}
        conn.execute('DELETE FROM user_1.product_images WHERE product_id = 1 AND "order" = 0')
        synced = conn.execute("SELECT images FROM user_1.products WHERE id = 1").fetchone()
    assert stages == {"table"}
    assert synced is not None
    assert len(synced[0]) == len(before[("user_1", 1)]) - 1, "reverse sync is back"


def test_contract_refuses_a_tenant_not_at_table(migrated_url: str) -> None:
    """A tenant still at jsonb is refused with the reason; nothing is dropped."""
    with pytest.raises(ContractRefusedError, match="stage is 'jsonb'"):
        migrate.upgrade(migrated_url, revision=migrate.CONTRACT, options=NOW)
    with psycopg.connect(migrated_url) as conn:
        column = conn.execute(
            "SELECT count(*) FROM information_schema.columns "
            "WHERE table_schema = 'user_1' AND table_name = 'products' AND column_name = 'images'"
        ).fetchone()
    assert column == (1,)


def test_contract_refuses_too_young_table_stage_and_jsonb_readers(migrated_url: str) -> None:
    """The minimum table age and a service instance still reading JSONB both block it."""
    to_table(migrated_url, ["user_5"])
    with pytest.raises(ContractRefusedError, match="less than"):
        migrate.upgrade(migrated_url, tenants=["user_5"], revision=migrate.CONTRACT)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO imgmig.reader_heartbeats (instance, tenant, stage) "
            "VALUES ('web-7', 'user_5', 'dual_write')"
        )
    with pytest.raises(ContractRefusedError, match="web-7 still reads JSONB"):
        migrate.upgrade(migrated_url, tenants=["user_5"], revision=migrate.CONTRACT, options=NOW)


def test_downgrade_without_archive_restores_from_table_and_says_so(migrated_url: str) -> None:
    """With the archive gone, the downgrade still rebuilds JSONB from product_images."""
    to_table(migrated_url, ["user_4"])
    before = images_by_product(migrated_url, ["user_4"])
    migrate.upgrade(migrated_url, tenants=["user_4"], revision=migrate.CONTRACT, options=NOW)
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        conn.execute("DROP TABLE imgmig.images_archive")
    with capture_logs() as logs:
        migrate.downgrade(migrated_url, migrate.EXPAND, tenants=["user_4"])
    assert any(e["event"].startswith("archive missing") for e in logs)
    after = images_by_product(migrated_url, ["user_4"])
    assert after.keys() == before.keys()
    with psycopg.connect(migrated_url) as conn:
        same = [
            conn.execute(
                "SELECT imgmig.images_hash(%s::jsonb) = imgmig.images_hash(%s::jsonb)",
                (Jsonb(before[k]), Jsonb(after[k])),
            ).fetchone()
            for k in before
        ]
    assert same == [(True,)] * len(before), "same canonical images for every product"
    exact = sum(before[k] == after[k] for k in before)
    assert exact >= len(before) * 0.8, "only legacy quirks (order) may be normalised"


def test_archive_restore_puts_back_archived_jsonb(migrated_url: str) -> None:
    """`archive restore` writes archived JSONB over drifted products once the column exists."""
    to_table(migrated_url, ["user_5"])
    before = images_by_product(migrated_url, ["user_5"])
    migrate.upgrade(migrated_url, tenants=["user_5"], revision=migrate.CONTRACT, options=NOW)
    with (
        psycopg.connect(migrated_url) as conn,
        pytest.raises(ContractRefusedError, match="downgrade first"),
    ):
        restore_archive(conn, "user_5")
    migrate.downgrade(migrated_url, migrate.EXPAND, tenants=["user_5"])
    with psycopg.connect(migrated_url) as conn:
        # JSONB drift the rows do not share (capture skips a write marked as its own)
        conn.execute("SELECT set_config('imgmig.syncing', 'capture', false)")
        conn.execute("UPDATE user_5.products SET images = '[]' WHERE id <= 3")
        assert restore_archive(conn, "user_5") == (3, 0)
        conn.commit()
    assert images_by_product(migrated_url, ["user_5"]) == before


def test_archive_restore_leaves_a_product_changed_since_the_contract(migrated_url: str) -> None:
    """By default only archived bytes go back, never archived content: an image the
    service removed after the contract stays removed unless --include-changed."""
    to_table(migrated_url, ["user_5"])
    before = images_by_product(migrated_url, ["user_5"])
    migrate.upgrade(migrated_url, tenants=["user_5"], revision=migrate.CONTRACT, options=NOW)
    with psycopg.connect(migrated_url, autocommit=True) as conn:  # the service, contracted
        gone = conn.execute(
            'DELETE FROM user_5.product_images WHERE product_id = 1 AND "order" = 0 RETURNING url'
        ).fetchone()
    assert gone is not None
    migrate.downgrade(migrated_url, migrate.EXPAND, tenants=["user_5"])
    with psycopg.connect(migrated_url) as conn:
        assert restore_archive(conn, "user_5") == (0, 1)
        conn.commit()
        assert gone[0] not in [
            e["url"] for e in images_by_product(migrated_url, ["user_5"])[("user_5", 1)]
        ]
        assert restore_archive(conn, "user_5", include_changed=True) == (1, 1)
        conn.commit()
    assert images_by_product(migrated_url, ["user_5"]) == before


def test_rebuild_waits_for_a_concurrent_writer_and_never_resurrects(migrated_url: str) -> None:
    """A table write committed while a restore batch waits for its lock is kept: the batch
    rebuilds from rows read after the lock, and its JSONB is not projected back."""
    to_table(migrated_url, ["user_5"])
    migrate.upgrade(migrated_url, tenants=["user_5"], revision=migrate.CONTRACT, options=NOW)
    migrate.downgrade(migrated_url, migrate.EXPAND, tenants=["user_5"])
    writer = psycopg.connect(migrated_url)
    gone = writer.execute(
        'SELECT url FROM user_5.product_images WHERE product_id = 1 ORDER BY "order" LIMIT 1'
    ).fetchone()
    assert gone is not None
    writer.execute("SELECT id FROM user_5.products WHERE id = 1 FOR UPDATE")
    writer.execute(
        "DELETE FROM user_5.product_images WHERE product_id = 1 AND url = %s", (gone[0],)
    )
    done = threading.Event()

    def restore() -> None:
        with psycopg.connect(migrated_url, autocommit=True) as conn:
            rebuild_jsonb(conn, "user_5", batch_size=10, use_archive=True)
        done.set()

    thread = threading.Thread(target=restore)
    thread.start()
    with psycopg.connect(migrated_url, autocommit=True) as watch:
        for _ in range(100):
            waiting = watch.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE '%FOR NO KEY UPDATE%'"
            ).fetchone()
            if waiting and waiting[0]:
                break
            time.sleep(0.05)
    assert not done.is_set(), "the batch waits for the writer's lock"
    writer.commit()
    writer.close()
    thread.join(timeout=30)
    with psycopg.connect(migrated_url) as conn:
        rows = conn.execute(
            "SELECT count(*) FROM user_5.product_images WHERE product_id = 1 AND url = %s",
            (gone[0],),
        ).fetchone()
        images = conn.execute("SELECT images FROM user_5.products WHERE id = 1").fetchone()
    assert rows == (0,), "the deleted image was not resurrected in the table"
    assert images is not None
    assert gone[0] not in [e["url"] for e in images[0]]


@pytest.mark.timeout(180)
def test_a_killed_restore_leaves_the_table_the_truth_until_it_is_finished(
    migrated_url: str,
) -> None:
    """A downgrade SIGKILLed mid-rebuild leaves the column back, partly rebuilt, at stage
    table. Nothing may make that JSONB the truth (a guarded or forced stage change, the
    kill switch, archive restore); reconcile repairs it from the rows; deploy run stops and
    says why; deploy rollback finishes the restore, exactly."""
    to_table(migrated_url, ["user_1"])
    before = images_by_product(migrated_url, ["user_1"])
    count_rows = "SELECT count(*) FROM user_1.product_images"
    with psycopg.connect(migrated_url) as conn:
        rows = conn.execute(count_rows).fetchone()
    migrate.upgrade(migrated_url, tenants=["user_1"], revision=migrate.CONTRACT, options=NOW)
    left = interrupt_restore(migrated_url, "user_1", batch_size=1)
    assert left is not None, "killed before its last batch"
    assert 0 < left < len(before), "killed mid-rebuild"
    with psycopg.connect(migrated_url) as conn:
        assert cutover.restore_unfinished(conn, "user_1")
        for target in (Stage.SHADOW_READ, Stage.DUAL_WRITE, Stage.JSONB):
            with pytest.raises(StageRefusedError, match="restoring downgrade has not finished"):
                cutover.change_stage(conn, "user_1", target, reason="test", force=True)
            conn.rollback()
        [moved] = [m for m in cutover.kill_switch(conn, reason="test") if m.tenant == "user_1"]
        assert moved.to_stage is Stage.TABLE
        assert moved.error is None
        assert "restoring downgrade" in moved.note
        with pytest.raises(ContractRefusedError, match="restoring downgrade"):
            restore_archive(conn, "user_1")
    with pytest.raises(DeployStoppedError, match="restoring downgrade"):
        deploy.run(migrated_url, ["user_1"], DeployOptions(
            shadow_wait_s=0.1, contract_min_table_age_s=0, confirm_contract=True
        ))  # fmt: skip
    with pytest.raises(StageRefusedError, match="restoring downgrade"):  # would do nothing
        migrate.upgrade(migrated_url, tenants=["user_1"], revision=migrate.CONTRACT)
    [outcome] = reconcile.run(migrated_url, ["user_1"], mode="reconcile")
    assert outcome.exit_code == 1, "the unrestored JSONB is drift, repaired from the rows"
    with psycopg.connect(migrated_url) as conn:
        assert conn.execute(count_rows).fetchone() == rows, "no row lost"
        assert [s.next_step for s in deploy.status(conn, ["user_1"])] == [
            "rollback: finish the restore"
        ]
    assert deploy.rollback(migrated_url, ["user_1"], reason="test") == {"user_1": Stage.TABLE}
    with psycopg.connect(migrated_url) as conn:
        assert migrate.tenant_revision(conn, "user_1") == migrate.EXPAND
        assert not cutover.restore_unfinished(conn, "user_1")
        assert conn.execute(count_rows).fetchone() == rows
    assert images_by_product(migrated_url, ["user_1"]) == before, "restored exactly"
    assert deploy.rollback(migrated_url, ["user_1"], reason="test") == {"user_1": Stage.SHADOW_READ}


def test_a_restore_killed_while_installing_its_triggers_is_finished_with_them(
    migrated_url: str,
) -> None:
    """The stage and the triggers it needs commit together: a downgrade SIGKILLed while it
    installs them leaves the tenant contracted, and finishing it installs every one."""
    to_table(migrated_url, ["user_5"])
    with psycopg.connect(migrated_url) as conn:
        wanted = capture.installed_triggers(conn, "user_5")
    assert wanted, "stage table has capture and reverse triggers"
    migrate.upgrade(migrated_url, tenants=["user_5"], revision=migrate.CONTRACT, options=NOW)
    assert interrupt_restore(migrated_url, "user_5", at="triggers") is not None
    with psycopg.connect(migrated_url) as conn:
        assert cutover.restore_unfinished(conn, "user_5")
        assert stage_of(conn, "user_5") is Stage.CONTRACTED, "no stage without its triggers"
    assert deploy.rollback(migrated_url, ["user_5"], reason="test") == {"user_5": Stage.TABLE}
    with psycopg.connect(migrated_url) as conn:
        assert capture.installed_triggers(conn, "user_5") == wanted
        assert not cutover.restore_unfinished(conn, "user_5")
