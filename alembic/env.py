"""Multi-tenant Alembic environment.

1. Find the tenant schemas in the catalog (``cdc.tenants.discover``), or take the ones
   named with ``-x tenant=NAME`` (comma-separated), which must exist.
2. For each tenant, in natural order: point ``search_path`` at it, keep the version
   table in that schema, and run the revisions in one transaction for that schema.
   (Revisions may step out into ``autocommit_block()`` for CONCURRENTLY statements.)
3. Keep the tenant's ledger of the revisions that really ran (``cdc.migrate``,
   ``imgmig_revisions``), and on an upgrade first send a tenant at ``expand`` back
   before any additive revision it skipped (one a later release inserted before the
   marker, which Alembic alone would count as applied). An upgrade refuses a tenant whose
   restoring downgrade was killed (``cdc.cutover.restore_unfinished``): it is still at
   ``contract``, so Alembic would silently do nothing.
"""

from __future__ import annotations

from typing import Any

from alembic.runtime.migration import MigrationContext, MigrationInfo
from alembic.util import CommandError
from psycopg import sql
from sqlalchemy import create_engine, pool

from alembic import context
from cdc import cutover, migrate
from cdc import tenants as tenant_mod
from cdc.cutover import RESTORE_UNFINISHED
from cdc.errors import ImgmigError, StageRefusedError
from cdc.migrate import database_url, wanted_tenants
from cdc.server import sqlalchemy_url

config = context.config


def _recorder(dbapi: Any, tenant: str) -> Any:
    """An ``on_version_apply`` hook that keeps the tenant's ledger (stamps are not runs)."""

    def record(*, ctx: MigrationContext, step: MigrationInfo, heads: Any, run_args: Any) -> None:
        if step.is_migration and step.up_revision_id is not None:
            migrate.record_step(dbapi, tenant, step.up_revision_id, applied=step.is_upgrade)

    return record


def _additive_revisions() -> list[str]:
    """The revisions before the ``expand`` marker, oldest first."""
    return migrate.walk_additive(context.get_context().environment_context.script)  # type: ignore[union-attr]


def _command() -> str:
    """``upgrade``, ``downgrade``, or what else Alembic is running env.py for."""
    env = context.get_context().environment_context
    fn = env.context_opts.get("fn") if env is not None else None
    return str(getattr(fn, "__name__", ""))


def run_online() -> None:
    url = database_url(config)
    engine = create_engine(sqlalchemy_url(url), poolclass=pool.NullPool)
    with engine.connect() as connection:
        dbapi = connection.connection.dbapi_connection
        assert dbapi is not None
        chosen = tenant_mod.resolve(dbapi, wanted_tenants(config))  # type: ignore[arg-type]
        connection.rollback()
        for tenant in chosen:
            connection.exec_driver_sql(
                sql.SQL("SET search_path TO {}, public")
                .format(sql.Identifier(tenant))
                .as_string(
                    dbapi  # type: ignore[arg-type]
                )
            )
            connection.commit()  # so that Alembic owns the tenant's transaction
            context.configure(
                connection=connection,
                target_metadata=None,
                version_table_schema=tenant,
                transactional_ddl=True,
                on_version_apply=_recorder(dbapi, tenant),
            )
            with context.begin_transaction():
                command = _command()
                if command in ("upgrade", "downgrade"):  # not for current, history, stamp
                    migrate.ensure_ledger(dbapi, tenant, migrate.policy_from(config))  # type: ignore[arg-type]
                if command == "upgrade" and cutover.restore_unfinished(dbapi, tenant):  # type: ignore[arg-type]
                    # At `contract` already, Alembic would do nothing and say nothing.
                    raise StageRefusedError(
                        tenant=tenant, stage="table", action="upgrade", why=RESTORE_UNFINISHED
                    )
                if command == "upgrade":
                    migrate.heal_skipped(dbapi, tenant, _additive_revisions())  # type: ignore[arg-type]
                context.run_migrations()
            connection.commit()
    engine.dispose()


def main() -> None:
    if context.is_offline_mode():
        raise CommandError("offline (--sql) mode is not supported: revisions are lock-aware")
    try:
        run_online()
    except ImgmigError as exc:
        if config.cmd_opts is not None:  # the `alembic` command line: one clean line
            raise CommandError(str(exc)) from exc
        raise


main()
