"""The backfill batch skips PostgreSQL's product_id check only where that skips nothing else."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql
from structlog.testing import capture_logs

from cdc import backfill, fkcheck
from cdc.db import connect
from cdc.progress import Silent
from tests.backfill_helpers import (
    T,
    duplicate_orders,
    exact_mismatches,
    orphan_rows,
    scalar,
    set_stage,
)

CONFIG = backfill.BackfillConfig(batch_size=60, workers=1)

# Records the session_replication_role under which each statement writing product_images
# (the batch) or the checkpoint (after it, in the same transaction) ran. ENABLE ALWAYS:
# they fire at 'replica' as well, and the guard leaves such triggers alone.
_WITNESS = """
CREATE TABLE public.role_seen (tbl text NOT NULL, role text NOT NULL);
CREATE FUNCTION public.see_role() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO public.role_seen
  VALUES (TG_TABLE_NAME, current_setting('session_replication_role'));
  RETURN NULL;
END $$;
CREATE TRIGGER role_witness AFTER INSERT ON user_1.product_images
  FOR EACH STATEMENT EXECUTE FUNCTION public.see_role();
ALTER TABLE user_1.product_images ENABLE ALWAYS TRIGGER role_witness;
CREATE TRIGGER role_witness AFTER INSERT OR UPDATE ON imgmig.backfill_state
  FOR EACH STATEMENT EXECUTE FUNCTION public.see_role();
ALTER TABLE imgmig.backfill_state ENABLE ALWAYS TRIGGER role_witness;
"""


REPLICA_THEN_ORIGIN = {("product_images", "replica"), ("backfill_state", "origin")}
ORIGIN = {("product_images", "origin"), ("backfill_state", "origin")}


def _with_witness(url: str) -> None:
    set_stage(url, "dual_write", (T,))
    with connect(url) as conn:
        conn.execute(_WITNESS)
        conn.commit()


def _roles_seen(url: str) -> set[tuple[str, str]]:
    """(table, role) of the statements the witness saw."""
    with connect(url, autocommit=True) as conn:
        return {
            (str(r[0]), str(r[1])) for r in conn.execute("SELECT tbl, role FROM public.role_seen")
        }


def _assert_exact(url: str) -> None:
    with connect(url, autocommit=True) as conn:
        assert exact_mismatches(conn, T) == 0
        assert duplicate_orders(conn, T) == 0
        assert orphan_rows(conn, T) == 0


def test_batches_run_at_replica_and_project_exactly(migrated_url: str) -> None:
    """A superuser's batches skip the check (the statement runs at 'replica'), and the rows
    are exact; labels and checkpoints after it run at the connection's own role again."""
    _with_witness(migrated_url)
    [result] = backfill.run(migrated_url, [T], CONFIG, Silent())
    assert result.status == "done"
    assert result.batches > 1
    assert result.fk_check_skipped == result.batches
    assert _roles_seen(migrated_url) == REPLICA_THEN_ORIGIN
    _assert_exact(migrated_url)


def test_fk_check_always_keeps_it(migrated_url: str) -> None:
    _with_witness(migrated_url)
    config = backfill.BackfillConfig(batch_size=60, workers=1, fk_check="always")
    [result] = backfill.run(migrated_url, [T], config, Silent())
    assert result.status == "done"
    assert result.fk_check_skipped == 0
    assert _roles_seen(migrated_url) == ORIGIN
    _assert_exact(migrated_url)


# Each would be skipped along with the product_id check at 'replica', or start to fire.
OTHER_TRIGGERS = {
    "an audit trigger on product_images": """
        CREATE TABLE public.audit (n bigint NOT NULL);
        CREATE FUNCTION public.audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.audit VALUES (NEW.id); RETURN NULL; END $$;
        CREATE TRIGGER audit AFTER INSERT ON user_1.product_images
          FOR EACH ROW EXECUTE FUNCTION public.audit_row();""",
    "a foreign key to product_images, ON DELETE CASCADE": """
        CREATE TABLE public.crops (
          image_id bigint REFERENCES user_1.product_images (id) ON DELETE CASCADE);""",
    "a trigger enabled for replica only, which would start to fire": """
        CREATE FUNCTION public.on_replica() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RETURN NULL; END $$;
        CREATE TRIGGER on_replica AFTER INSERT ON user_1.product_images
          FOR EACH ROW EXECUTE FUNCTION public.on_replica();
        ALTER TABLE user_1.product_images ENABLE REPLICA TRIGGER on_replica;""",
    "an insert trigger on image_events": """
        CREATE FUNCTION public.notify_event() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN RETURN NULL; END $$;
        CREATE TRIGGER relay AFTER INSERT ON user_1.image_events
          FOR EACH ROW EXECUTE FUNCTION public.notify_event();""",
}


@pytest.mark.parametrize("ddl", OTHER_TRIGGERS.values(), ids=OTHER_TRIGGERS.keys())
def test_another_trigger_keeps_every_check(migrated_url: str, ddl: str) -> None:
    """Where 'replica' would skip another trigger too, no batch uses it, and the run says
    why once."""
    _with_witness(migrated_url)
    with connect(migrated_url) as conn:
        conn.execute(ddl)
        conn.commit()
    with capture_logs() as logs:
        [result] = backfill.run(migrated_url, [T], CONFIG, Silent())
    assert result.status == "done"
    assert result.fk_check_skipped == 0
    assert _roles_seen(migrated_url) == ORIGIN
    told = [e for e in logs if e["event"].startswith("backfill batches keep the product_id")]
    assert len(told) == 1
    assert told[0]["why"] == "other triggers would be skipped with it"
    assert told[0]["triggers"]  # names what would have been skipped
    _assert_exact(migrated_url)
    if "audit" in ddl:  # it fired for every row the backfill wrote
        with connect(migrated_url, autocommit=True) as conn:
            audited = scalar(conn, sql.SQL("SELECT count(*) FROM public.audit"))
            assert audited == scalar(conn, sql.SQL("SELECT count(*) FROM user_1.product_images"))


def test_only_a_role_allowed_to_set_the_parameter_skips(migrated_url: str) -> None:
    """No privilege: None, and the caller's transaction is untouched; after GRANT SET ON
    PARAMETER (PostgreSQL 15+): the connection's own value."""
    role = f"imgmig_fk_{uuid.uuid4().hex[:8]}"
    with connect(migrated_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(role)))
    try:
        with psycopg.connect(migrated_url) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            conn.execute("SELECT 1")  # the caller's open transaction
            assert fkcheck.allowed(conn) is None
            assert conn.execute("SELECT 41 + 1").fetchone() == (42,)  # still usable
            conn.rollback()
        with connect(migrated_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("GRANT SET ON PARAMETER session_replication_role TO {}").format(
                    sql.Identifier(role)
                )
            )
        with psycopg.connect(migrated_url, autocommit=True) as conn:
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            assert fkcheck.allowed(conn) == "origin"
            role_now = conn.execute("SHOW session_replication_role").fetchone()
            assert role_now == ("origin",)  # tried and rolled back
    finally:
        with connect(migrated_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("REVOKE SET ON PARAMETER session_replication_role FROM {}").format(
                    sql.Identifier(role)
                )
            )
            admin.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
