"""The expand revision: product_images and the control schema in every tenant, lock-safe."""

from __future__ import annotations

import psycopg
import pytest

from cdc import migrate, tenants
from cdc.errors import UnknownTenantError

TENANTS = ["user_1", "user_2", "user_4", "user_5", "template_tenant"]
EXPECTED_COLUMNS = {
    "id", "product_id", "url", "order", "is_label", "alt_text", "tags", "mime_type",
    "file_size", "width", "height", "created_at", "updated_at",
}  # fmt: skip


def schema_snapshot(url: str) -> dict[str, object]:
    """Everything the expand revision creates, as comparable data."""
    with psycopg.connect(url) as conn:
        columns = conn.execute(
            "SELECT table_schema, column_name, data_type, is_nullable FROM "
            "information_schema.columns WHERE table_name = 'product_images' ORDER BY 1, 2"
        ).fetchall()
        indexes = conn.execute(
            "SELECT schemaname, indexname, indexdef FROM pg_indexes "
            "WHERE tablename = 'product_images' ORDER BY 1, 2"
        ).fetchall()
        constraints = conn.execute(
            "SELECT n.nspname, c.conname, c.convalidated, pg_get_constraintdef(c.oid) "
            "FROM pg_constraint c JOIN pg_namespace n ON n.oid = c.connamespace "
            "WHERE c.conrelid::regclass::text LIKE '%product_images' ORDER BY 1, 2"
        ).fetchall()
        stages = conn.execute(
            "SELECT tenant, stage FROM imgmig.tenant_state ORDER BY tenant"
        ).fetchall()
        versions = {
            t: conn.execute(f'SELECT version_num FROM "{t}".alembic_version').fetchall()
            for t in TENANTS
        }
    return {"columns": columns, "indexes": indexes, "constraints": constraints,
            "stages": stages, "versions": versions}  # fmt: skip


def test_upgrade_creates_table_indexes_and_stage_in_every_tenant(migrated_url: str) -> None:
    """Each tenant gets product_images, its indexes, a validated FK and stage jsonb."""
    with psycopg.connect(migrated_url) as conn:
        assert tenants.discover(conn) == TENANTS
        for t in TENANTS:
            cols = {r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = %s AND table_name = 'product_images'", (t,))}  # fmt: skip
            assert cols >= EXPECTED_COLUMNS, t
            idx = {r[0]: r[1] for r in conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = %s "
                "AND tablename = 'product_images'", (t,))}  # fmt: skip
            assert 'product_id, "order"' in idx["product_images_product_order_idx"]
            assert "(is_label)" in idx["product_images_is_label_idx"]
            assert "UNIQUE" in idx["product_images_one_label_uidx"]
            assert "WHERE is_label" in idx["product_images_one_label_uidx"]
            fk = conn.execute(
                "SELECT convalidated, pg_get_constraintdef(oid) FROM pg_constraint "
                "WHERE conrelid = %s::regclass AND contype = 'f'",
                (f"{t}.product_images",),
            ).fetchone()
            assert fk is not None
            assert fk[0] is True
            assert "ON DELETE CASCADE" in fk[1]
        rows = conn.execute("SELECT tenant, stage FROM imgmig.tenant_state").fetchall()
        stages = {str(r[0]): str(r[1]) for r in rows}
        assert stages == dict.fromkeys(TENANTS, "jsonb")


def test_one_label_per_product_is_enforced(migrated_url: str) -> None:
    """The partial unique index refuses a second label on one product."""
    with psycopg.connect(migrated_url) as conn:
        conn.execute(
            'INSERT INTO user_1.product_images (product_id, url, "order", is_label) '
            "VALUES (1, 'https://x/a.png', 0, true), (1, 'https://x/b.jpg', 1, false)"
        )
        with pytest.raises(psycopg.errors.UniqueViolation):
            conn.execute(
                'INSERT INTO user_1.product_images (product_id, url, "order", is_label) '
                "VALUES (1, 'https://x/c.png', 2, true)"
            )


def test_upgrade_downgrade_upgrade_round_trip(migrated_url: str) -> None:
    """Downgrade removes everything on every tenant; upgrading again recreates the same schema."""
    before = schema_snapshot(migrated_url)
    migrate.downgrade(migrated_url, "base")
    with psycopg.connect(migrated_url) as conn:
        left = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'product_images'"
        ).fetchone()
        control = conn.execute(
            "SELECT count(*) FROM pg_namespace WHERE nspname = 'imgmig'"
        ).fetchone()
        products = conn.execute("SELECT count(*) FROM user_1.products").fetchone()
    assert left == (0,)
    assert control == (0,)
    assert products is not None
    assert products[0] > 0, "downgrade must never touch products"
    migrate.upgrade(migrated_url)
    assert schema_snapshot(migrated_url) == before


def test_rerun_changes_nothing(migrated_url: str) -> None:
    """A second upgrade to head is a no-op: same schema, same stages, same versions."""
    before = schema_snapshot(migrated_url)
    migrate.upgrade(migrated_url)
    assert schema_snapshot(migrated_url) == before


def test_idempotent_after_partial_run(migrated_url: str) -> None:
    """Steps are idempotent: rerunning expand over an existing table and index heals a gap."""
    with psycopg.connect(migrated_url, autocommit=True) as conn:
        conn.execute("DROP INDEX user_2.product_images_is_label_idx")
        conn.execute("DELETE FROM user_2.alembic_version")
    migrate.upgrade(migrated_url, tenants=["user_2"])
    with psycopg.connect(migrated_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_indexes WHERE schemaname = 'user_2' "
            "AND indexname = 'product_images_is_label_idx'"
        ).fetchone()
    assert row == (1,)


def test_tenant_option_limits_the_run(seeded_url: str) -> None:
    """Upgrading one tenant leaves the others untouched."""
    migrate.upgrade(seeded_url, tenants=["user_4"])
    with psycopg.connect(seeded_url) as conn:
        rows = conn.execute(
            "SELECT table_schema FROM information_schema.tables WHERE table_name = 'product_images'"
        ).fetchall()
    assert rows == [("user_4",)]


def test_unknown_tenant_is_a_clear_error(seeded_url: str) -> None:
    """Naming a tenant that does not exist fails before anything runs."""
    with pytest.raises(UnknownTenantError, match="user_3"):
        migrate.upgrade(seeded_url, tenants=["user_3"])
    with psycopg.connect(seeded_url) as conn:
        row = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = 'imgmig'").fetchone()
    assert row == (0,)
