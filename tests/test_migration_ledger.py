"""The revision ledger: a revision a later release inserts before ``expand`` still runs.

Alembic records only the revision a tenant is at. A tenant an earlier release left at
``expand`` would count every revision inserted before the marker since as applied; the
ledger (``<tenant>.imgmig_revisions``) says what really ran, and an upgrade first sends
such a tenant back to run what it missed.
"""

from __future__ import annotations

from datetime import datetime

import psycopg
from psycopg import sql

from cdc import deploy, migrate, project
from tests.capture_support import TENANT, Conn, go, img, in_sync, new_product, write_images

LOG_FUNCTION = f"{TENANT}.imgmig_log_products_row()"


def ledger(conn: Conn, tenant: str = TENANT) -> dict[str, datetime]:
    rows = conn.execute(
        sql.SQL("SELECT revision, applied_at FROM {}").format(
            sql.Identifier(tenant, migrate.LEDGER_TABLE)
        )
    ).fetchall()
    return {str(r[0]): r[1] for r in rows}


def has_function(conn: Conn, signature: str) -> bool:
    row = conn.execute("SELECT to_regprocedure(%s) IS NOT NULL", (signature,)).fetchone()
    return bool(row and row[0])


def log_trigger_functions(conn: Conn) -> set[str]:
    rows = conn.execute(
        "SELECT DISTINCT p.oid::regprocedure::text FROM pg_trigger t "
        "JOIN pg_proc p ON p.oid = t.tgfoid WHERE t.tgrelid = %s::regclass "
        "AND NOT t.tgisinternal",
        (f"{TENANT}.products",),
    ).fetchall()
    return {str(r[0]) for r in rows}


def stamp_as_an_earlier_release(conn: Conn, tenant: str = TENANT) -> None:
    """What an earlier release leaves: the tenant at ``expand``, fewer revisions run."""
    conn.execute(
        sql.SQL("UPDATE {} SET version_num = 'expand'").format(
            sql.Identifier(tenant, "alembic_version")
        )
    )


def every_additive_revision() -> list[str]:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.alembic_config("postgresql://unused"))
    walked = [r.revision for r in script.walk_revisions(base="base", head=migrate.EXPAND)]
    return list(reversed(walked))


def test_every_tenant_ledger_lists_the_revisions_it_ran(conn: Conn) -> None:
    revisions = every_additive_revision()
    assert revisions[0] == "0001_expand"
    assert revisions[-1] == migrate.EXPAND
    for tenant in migrate.migrated_tenants(conn):
        assert set(ledger(conn, tenant)) == set(revisions), tenant


def test_a_revision_inserted_before_the_marker_runs_on_a_tenant_already_there(
    conn: Conn, migrated_url: str
) -> None:
    """The tenant ran up to 0003 when its release put ``expand`` there; 0004 still runs."""
    go(conn, "dual_write")
    with conn.transaction():
        project.set_mode(conn, TENANT, "deferred")
    migrate.downgrade(migrated_url, "0003_capture_v2", tenants=[TENANT])
    assert not has_function(conn, LOG_FUNCTION)
    assert "0004_capture_v3" not in ledger(conn)
    stamp_as_an_earlier_release(conn)
    assert migrate.tenant_revision(conn, TENANT) == migrate.EXPAND
    migrate.upgrade(migrated_url)  # Alembic alone would do nothing here
    assert migrate.tenant_revision(conn, TENANT) == migrate.EXPAND
    assert has_function(conn, LOG_FUNCTION)
    assert LOG_FUNCTION in log_trigger_functions(conn)  # the deferred triggers moved to it
    assert set(ledger(conn)) == set(every_additive_revision())


def test_a_tenant_from_before_the_ledger_reruns_the_later_revisions(
    conn: Conn, migrated_url: str
) -> None:
    """No ledger: what came after the first release's marker runs again, data kept."""
    go(conn, "dual_write")
    pid = new_product(conn, [img("https://cdn.example/a.jpg", 0)])
    conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(TENANT, migrate.LEDGER_TABLE)))
    dropped_at = conn.execute("SELECT clock_timestamp()").fetchone()
    assert dropped_at is not None
    migrate.upgrade(migrated_url)
    after = ledger(conn)
    assert set(after) == set(every_additive_revision())
    later = every_additive_revision()
    later = later[later.index(migrate.FIRST_RELEASE_MARKER_PARENT) + 1 :]
    assert {"0003_capture_v2", "0004_capture_v3", migrate.EXPAND} <= set(later)
    assert all(after[r] > dropped_at[0] for r in later)  # these ran again
    migrate.upgrade(migrated_url)
    assert ledger(conn) == after  # and once is enough
    assert in_sync(conn, pid)
    write_images(
        conn, pid, [img("https://cdn.example/b.jpg", 0), img("https://cdn.example/a.jpg", 1)]
    )
    assert in_sync(conn, pid)  # capture still projects legacy writes


def test_an_up_to_date_tenant_is_not_sent_back(conn: Conn, migrated_url: str) -> None:
    before = ledger(conn)
    migrate.upgrade(migrated_url)
    assert ledger(conn) == before
    assert migrate.tenant_revision(conn, TENANT) == migrate.EXPAND


def test_read_only_commands_leave_no_ledger_behind(seeded_url: str) -> None:
    """``alembic current`` on a never-migrated database creates nothing."""
    from alembic import command

    command.current(migrate.alembic_config(seeded_url))
    with psycopg.connect(seeded_url) as c:
        row = c.execute(
            "SELECT count(*) FROM pg_class WHERE relname = %s", (migrate.LEDGER_TABLE,)
        ).fetchone()
        assert row is not None
        assert row[0] == 0


def test_deploy_runs_the_skipped_revisions_before_the_next_stage(
    conn: Conn, migrated_url: str
) -> None:
    """``deploy`` counts a tenant at ``expand`` with skipped revisions as not expanded."""
    go(conn, "dual_write")
    migrate.downgrade(migrated_url, "0004_capture_v3", tenants=[TENANT])
    stamp_as_an_earlier_release(conn)
    assert migrate.skipped_revisions(conn, TENANT) == [
        "0005_mapping_v3",
        "0006_logical",
        "0007_inline_v5",
        "0008_mapping_v4",
    ]
    assert deploy.next_step(conn, TENANT) is deploy.Step.EXPAND
    assert deploy.plan(conn, [TENANT])[TENANT][:2] == [deploy.Step.EXPAND, deploy.Step.BACKFILL]
    migrate.upgrade(migrated_url, tenants=[TENANT])
    assert migrate.skipped_revisions(conn, TENANT) == []
    assert deploy.next_step(conn, TENANT) is deploy.Step.BACKFILL
