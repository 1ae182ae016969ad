"""Alembic, driven from Python: the same revisions ``alembic upgrade head`` runs.

Revisions call :func:`current_tenant` and :func:`raw_connection` to compose their SQL
with ``psycopg.sql`` against the schema env.py is migrating right now.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from psycopg import sql

from cdc.db import Conn
from cdc.ddl import DEFAULT_POLICY, LockPolicy, run_ddl

if TYPE_CHECKING:
    from alembic.config import Config

log = structlog.get_logger(__name__)

# Alembic is imported where it is used: the CLI's other verbs start faster without it.
ROOT = Path(__file__).resolve().parent.parent
DEMO_PGDATA = ROOT / ".imgmig" / "pgdata"


def alembic_config(
    url: str, tenants: Sequence[str] | None = None, *, policy: LockPolicy | None = None
) -> Config:
    """An Alembic config bound to ``url`` (and optionally to some tenants)."""
    from alembic.config import Config

    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "alembic"))
    cfg.attributes["url"] = url
    if tenants is not None:
        cfg.attributes["tenants"] = list(tenants)
    if policy is not None:
        cfg.attributes["lock_policy"] = policy
    return cfg


def lock_policy() -> LockPolicy:
    """The DDL lock policy for the running revision.

    ``-x lock_timeout_ms=500 -x ddl_attempts=5`` on the alembic command line, or a
    policy passed programmatically; the defaults otherwise.
    """
    from alembic import op

    return policy_from(op.get_context().config)


def policy_from(cfg: Config | None) -> LockPolicy:
    """The DDL lock policy an Alembic config carries (programmatic, then ``-x``)."""
    if cfg is None:
        return DEFAULT_POLICY
    given = cfg.attributes.get("lock_policy")
    if isinstance(given, LockPolicy):
        return given
    x = {**_x_args(cfg), **{k: str(v) for k, v in cfg.attributes.items() if isinstance(v, str)}}
    return LockPolicy(
        lock_timeout_ms=int(x.get("lock_timeout_ms", DEFAULT_POLICY.lock_timeout_ms)),
        attempts=int(x.get("ddl_attempts", DEFAULT_POLICY.attempts)),
    )


def database_url(cfg: Config) -> str:
    """``-x url=``, a programmatic URL, DATABASE_URL, else the demo's embedded server."""
    x = _x_args(cfg)
    url = x.get("url") or cfg.attributes.get("url") or os.environ.get("DATABASE_URL")
    if url:
        return str(url)
    from cdc.server import start_embedded

    server, _handle = start_embedded(DEMO_PGDATA, keep_running=True)
    return server.url


def wanted_tenants(cfg: Config) -> list[str] | None:
    """Tenants named with ``-x tenant=a,b`` or programmatically; None means all."""
    x = _x_args(cfg)
    if "tenant" in x:
        return [t.strip() for t in x["tenant"].split(",") if t.strip()]
    tenants = cfg.attributes.get("tenants")
    return list(tenants) if tenants is not None else None


def x_option(name: str, default: str) -> str:
    """A ``-x name=value`` option (or ``attributes[name]``) for the running revision."""
    from alembic import op

    cfg = op.get_context().config
    if cfg is None:
        return default
    given = cfg.attributes.get(name)
    if given is not None:
        return str(given)
    return _x_args(cfg).get(name, default)


def _x_args(cfg: Config) -> dict[str, str]:
    if cfg.cmd_opts is None or not getattr(cfg.cmd_opts, "x", None):
        return {}
    pairs = (item.split("=", 1) for item in cfg.cmd_opts.x)
    return dict(pairs)


EXPAND = "expand"
CONTRACT = "contract"


def upgrade(
    url: str,
    *,
    tenants: Sequence[str] | None = None,
    revision: str = EXPAND,
    policy: LockPolicy | None = None,
    options: dict[str, str] | None = None,
) -> None:
    """``alembic upgrade`` on every tenant (or the given ones); to ``expand`` by default.

    ``options`` are what ``-x name=value`` gives on the command line.
    """
    cfg = alembic_config(url, tenants, policy=policy)
    cfg.attributes.update(options or {})
    from alembic import command

    command.upgrade(cfg, revision)


def downgrade(
    url: str,
    revision: str,
    *,
    tenants: Sequence[str] | None = None,
    policy: LockPolicy | None = None,
    options: dict[str, str] | None = None,
) -> None:
    """``alembic downgrade`` on every tenant (or the given ones)."""
    cfg = alembic_config(url, tenants, policy=policy)
    cfg.attributes.update(options or {})
    from alembic import command

    command.downgrade(cfg, revision)


def current_tenant() -> str:
    """The tenant schema env.py is migrating now (its version table lives there)."""
    from alembic import op

    schema: Any = op.get_context().opts.get("version_table_schema")
    if not schema:
        raise RuntimeError("revision run outside the multi-tenant env.py")
    return str(schema)


def raw_connection() -> Conn:
    """The psycopg connection under Alembic's, for ``psycopg.sql`` composition."""
    from alembic import op

    dbapi: Any = op.get_bind().connection.dbapi_connection
    return dbapi  # type: ignore[no-any-return]


def tenant_revision(conn: Conn, tenant: str) -> str | None:
    """The revision ``tenant`` is at (its own version table), None if never migrated."""
    row = conn.execute(
        "SELECT to_regclass(format('%%I.alembic_version', %s::text)) IS NOT NULL", (tenant,)
    ).fetchone()
    if not row or not row[0]:
        return None
    version = conn.execute(
        sql.SQL("SELECT version_num FROM {}").format(sql.Identifier(tenant, "alembic_version"))
    ).fetchone()
    return None if version is None else str(version[0])


def migrated_tenants(conn: Conn) -> list[str]:
    """Every schema that has an Alembic version table, i.e. every migrated tenant."""
    rows = conn.execute(
        "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.relname = 'alembic_version' AND c.relkind = 'r' ORDER BY n.nspname"
    ).fetchall()
    return [str(r[0]) for r in rows]


def others_after(conn: Conn, tenant: str, before: frozenset[str]) -> list[str]:
    """The migrated tenants other than ``tenant`` at a revision not in ``before``.

    A revision that changes the shared ``imgmig`` schema undoes that change only with
    the last tenant to leave it: the others still run on it.
    """
    return [
        other
        for other in migrated_tenants(conn)
        if other != tenant and tenant_revision(conn, other) not in before | {None}
    ]


# The revisions that really ran on a tenant, beside its Alembic version table. Alembic
# knows only the revision a tenant is *at*; a revision inserted before the ``expand``
# marker by a later release is an ancestor of it, so Alembic counts it as applied on a
# tenant already at ``expand`` and skips it. The ledger says what ran; ``heal_skipped``
# sends such a tenant back to run what it missed (every additive revision is idempotent).
LEDGER_TABLE = "imgmig_revisions"
#: The marker's parent in the first release, before the ledger existed: a tenant at
#: ``expand`` without a ledger has run up to this one at least.
FIRST_RELEASE_MARKER_PARENT = "0002_capture"


def ensure_ledger(conn: Conn, tenant: str, policy: LockPolicy = DEFAULT_POLICY) -> None:
    """Create the tenant's revision ledger if it does not exist yet."""
    stmt = sql.SQL(
        "CREATE TABLE IF NOT EXISTS {} (revision text PRIMARY KEY, "
        "applied_at timestamptz NOT NULL DEFAULT now())"
    ).format(sql.Identifier(tenant, LEDGER_TABLE))
    run_ddl(conn, stmt, policy=policy, schema=tenant)


def record_step(conn: Conn, tenant: str, revision: str, *, applied: bool) -> None:
    """Note that ``revision`` ran on ``tenant`` (an upgrade) or was undone (a downgrade)."""
    table = sql.Identifier(tenant, LEDGER_TABLE)
    if applied:
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (revision) VALUES (%s) "
                "ON CONFLICT (revision) DO UPDATE SET applied_at = now()"
            ).format(table),
            (revision,),
        )
    else:
        conn.execute(sql.SQL("DELETE FROM {} WHERE revision = %s").format(table), (revision,))


def applied_revisions(conn: Conn, tenant: str) -> set[str]:
    """What the tenant's ledger says ran (empty when it has no ledger)."""
    exists = conn.execute(
        "SELECT to_regclass(format('%%I.%%I', %s::text, %s::text)) IS NOT NULL",
        (tenant, LEDGER_TABLE),
    ).fetchone()
    if not exists or not exists[0]:
        return set()
    rows = conn.execute(
        sql.SQL("SELECT revision FROM {}").format(sql.Identifier(tenant, LEDGER_TABLE))
    ).fetchall()
    return {str(r[0]) for r in rows}


def skipped_revisions(conn: Conn, tenant: str, additive: Sequence[str] | None = None) -> list[str]:
    """The additive revisions a tenant at ``expand`` never ran (empty for any other).

    ``additive``: the revisions before the marker, oldest first (default: this release's,
    :func:`additive_revisions`). A tenant whose ledger is empty was migrated before the
    ledger existed: everything after ``FIRST_RELEASE_MARKER_PARENT`` counts as skipped.
    """
    if tenant_revision(conn, tenant) != EXPAND:
        return []
    chain = list(additive if additive is not None else additive_revisions())
    applied = applied_revisions(conn, tenant)
    if not applied:
        return chain[chain.index(FIRST_RELEASE_MARKER_PARENT) + 1 :]
    missing = [r for r in chain if r not in applied]
    return chain[chain.index(missing[0]) :] if missing else []


def heal_skipped(conn: Conn, tenant: str, additive: Sequence[str]) -> list[str]:
    """Send a tenant at ``expand`` back before the additive revisions it never ran.

    Returns the revisions the upgrade will now run before reaching the marker again
    (empty: nothing skipped). A tenant without a ledger gets one that starts with the
    first release's revisions (see :func:`skipped_revisions`).
    """
    rerun = skipped_revisions(conn, tenant, additive)
    if not rerun:
        return []
    start = list(additive).index(rerun[0])
    if not applied_revisions(conn, tenant):  # the first release ran these
        for revision in additive[:start]:
            record_step(conn, tenant, revision, applied=True)
    version = sql.Identifier(tenant, "alembic_version")
    if start == 0:
        conn.execute(sql.SQL("DELETE FROM {}").format(version))
    else:
        conn.execute(
            sql.SQL("UPDATE {} SET version_num = %s").format(version), (additive[start - 1],)
        )
    log.warning(
        "tenant was at expand without revisions added before the marker; running them now",
        tenant=tenant,
        rerun=rerun,
    )
    return rerun


def walk_additive(script: Any) -> list[str]:
    """The revisions of an Alembic ``ScriptDirectory`` before the marker, oldest first."""
    walked = [r.revision for r in script.walk_revisions(base="base", head=EXPAND)]
    return [r for r in reversed(walked) if r != EXPAND]


@functools.cache
def additive_revisions() -> tuple[str, ...]:
    """This release's revisions before the ``expand`` marker, oldest first."""
    from alembic.script import ScriptDirectory

    cfg = alembic_config("postgresql://unused")
    return tuple(walk_additive(ScriptDirectory.from_config(cfg)))
