"""Multi-tenant Alembic environment.

1. Find the tenant schemas in the catalog (``cdc.tenants.discover``), or take the ones
   named with ``-x tenant=NAME`` (comma-separated), which must exist.
2. For each tenant, in natural order: point ``search_path`` at it, keep the version
   table in that schema, and run the revisions in one transaction for that schema.
   (Revisions may step out into ``autocommit_block()`` for CONCURRENTLY statements.)
"""

from __future__ import annotations

from alembic.util import CommandError
from psycopg import sql
from sqlalchemy import create_engine, pool

from alembic import context
from cdc import tenants as tenant_mod
from cdc.errors import ImgmigError
from cdc.migrate import database_url, wanted_tenants
from cdc.server import sqlalchemy_url

config = context.config


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
            )
            with context.begin_transaction():
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
