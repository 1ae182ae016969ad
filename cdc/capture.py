"""Change capture: install the versioned SQL, and the triggers each stage needs.

The plpgsql lives in ``cdc/sql`` (``mapping_v1.sql``: the one canonical mapping;
``capture_v1.sql``: event log, diff projection, capture and reverse triggers, projector,
replay). It is shared by all tenants, installed idempotently under an advisory lock.

Triggers per stage (DESIGN.md, "Lifecycle"):

* ``jsonb``, ``contracted``: none;
* ``dual_write``, ``shadow_read``: capture on ``products`` (JSONB -> events -> rows);
* ``table``: reverse on ``product_images`` (rows -> JSONB) *and* capture, so that old
  app instances still writing JSONB land in the table; the transaction-local
  ``imgmig.syncing`` setting stops the two directions from feeding each other.

Capture comes in three shapes, after the tenant's projection mode. Both trigger shapes
are three row-level triggers (``UPDATE OF images`` with a ``WHEN`` clause, so other
writes cost nothing) whose function is written per tenant: ``inline``
(``<tenant>.imgmig_capture_products_row``, capture_v5.sql) logs and projects, applying an
append, a drop of the last element or a reorder directly and the diff otherwise (before
v5: statement-level triggers with transition tables, ``CAPTURE_V2``); ``deferred``
(``<tenant>.imgmig_log_products_row``, capture_v3.sql) only logs, for the projector to
apply later.
``logical`` has no trigger on ``products``: its table is in a publication and the WAL
reader (``cdc.logical``) writes the events the deferred trigger would have written.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from typing import Final

import structlog
from psycopg import sql

from cdc import checkpoint, logical
from cdc.db import Conn
from cdc.ddl import run_ddl
from cdc.errors import InvalidStageError, LogicalCaptureError, StageRefusedError

log = structlog.get_logger(__name__)

#: The SQL files of the current version, in install order.
CURRENT_SQL: Final = (
    "mapping_v1.sql",
    "capture_v1.sql",
    "mapping_v2.sql",
    "capture_v2.sql",
    "capture_v3.sql",
    "mapping_v3.sql",
    "capture_v4.sql",
    "capture_v5.sql",
    "mapping_v4.sql",
)

INSTALL_LOCK: Final = "imgmig.capture.install"
#: The deferred-mode trigger function, one per tenant (capture_v3.sql says why).
LOG_FUNCTION: Final = "imgmig_log_products_row"
#: The inline-mode trigger function, one per tenant (capture_v5.sql says why).
CAPTURE_FUNCTION: Final = "imgmig_capture_products_row"


@dataclass(frozen=True)
class TriggerSpec:
    """One AFTER trigger: statement-level with transition tables, or row-level.

    ``per_tenant``: the function lives in the tenant's schema (written for it by
    ``imgmig.install_log_function`` or ``imgmig.install_capture_function``), not in
    ``imgmig``.
    """

    name: str
    table: str
    event: str
    function: str
    row_level: bool = False
    per_tenant: bool = False

    def create(self, tenant: str, *, replace: bool = False) -> sql.Composed:
        """The CREATE [OR REPLACE] TRIGGER statement for ``tenant``."""
        return sql.SQL(
            "CREATE {replace}TRIGGER {name} AFTER {event} ON {table} {how} EXECUTE FUNCTION {fn}()"
        ).format(
            replace=sql.SQL("OR REPLACE " if replace else ""),
            name=sql.Identifier(self.name),
            event=sql.SQL(_ROW_EVENTS[self.event] if self.row_level else self.event),
            table=sql.Identifier(tenant, self.table),
            how=sql.SQL(_ROW_HOW[self.event] if self.row_level else _STATEMENT_HOW[self.event]),
            fn=self.function_name(tenant),
        )

    def function_name(self, tenant: str) -> sql.Identifier:
        """The trigger function, qualified."""
        return sql.Identifier(tenant if self.per_tenant else "imgmig", self.function)

    def drop(self, tenant: str) -> sql.Composed:
        """The DROP TRIGGER statement for ``tenant``."""
        return sql.SQL("DROP TRIGGER IF EXISTS {name} ON {table}").format(
            name=sql.Identifier(self.name), table=sql.Identifier(tenant, self.table)
        )


_STATEMENT_HOW: Final = {
    "INSERT": "REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT",
    "UPDATE": "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows FOR EACH STATEMENT",
    "DELETE": "REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT",
}
# PostgreSQL allows a column list and a WHEN clause only without transition tables.
_ROW_EVENTS: Final = {"INSERT": "INSERT", "UPDATE": "UPDATE OF images", "DELETE": "DELETE"}
_ROW_HOW: Final = {
    "INSERT": "FOR EACH ROW",
    "UPDATE": "FOR EACH ROW WHEN (OLD.images IS DISTINCT FROM NEW.images)",
    "DELETE": "FOR EACH ROW",
}
_EVENTS: Final = (("ins", "INSERT"), ("upd", "UPDATE"), ("del", "DELETE"))

CAPTURE: Final = tuple(
    TriggerSpec(
        f"imgmig_capture_{short}",
        "products",
        event,
        CAPTURE_FUNCTION,
        row_level=True,
        per_tenant=True,
    )
    for short, event in _EVENTS
)
#: v2's inline triggers: the same names, statement-level, on the shared
#: ``imgmig.capture_products()``. A database whose SQL predates capture v5 (a tenant taken
#: back below revision 0007_inline_v5) captures inline with these.
CAPTURE_V2: Final = tuple(
    dataclasses.replace(spec, function="capture_products", per_tenant=False, row_level=False)
    for spec in CAPTURE
)
LOG_ONLY: Final = tuple(
    TriggerSpec(
        f"imgmig_log_{short}",
        "products",
        event,
        LOG_FUNCTION,
        row_level=True,
        per_tenant=True,
    )
    for short, event in _EVENTS
)
REVERSE: Final = tuple(
    TriggerSpec(f"imgmig_reverse_{short}", "product_images", event, "reverse_images")
    for short, event in _EVENTS
)
ALL_TRIGGERS: Final = CAPTURE + LOG_ONLY + REVERSE
STAGES: Final = ("jsonb", "dual_write", "shadow_read", "table", "contracted")


PROJECTIONS: Final = ("inline", "deferred", "logical")
#: The stages in which a logical tenant's products are in the publication.
PUBLISHED_STAGES: Final = ("dual_write", "shadow_read")
#: Where the table is the truth: only inline projection keeps it current at every write.
TABLE_STAGES: Final = ("table", "contracted")


def triggers_for(
    stage: str, projection: str, *, inline: tuple[TriggerSpec, ...] = CAPTURE
) -> tuple[TriggerSpec, ...]:
    """The triggers a tenant at ``stage`` with ``projection`` needs (see PROJECTIONS).

    A logical tenant needs none on products: the WAL reader captures (cdc.logical).
    ``inline``: the inline capture triggers the database's SQL provides (``inline_triggers``).
    """
    if stage not in STAGES:
        raise InvalidStageError(stage=stage)
    capture = {"deferred": LOG_ONLY, "logical": ()}.get(projection, inline)
    if stage in ("dual_write", "shadow_read"):
        return capture
    if stage == "table":
        return capture + REVERSE
    return ()


def inline_triggers(conn: Conn) -> tuple[TriggerSpec, ...]:
    """CAPTURE, or CAPTURE_V2 where the database's SQL predates capture v5."""
    row = conn.execute(
        "SELECT to_regprocedure('imgmig.install_capture_function(text, boolean)') IS NOT NULL"
    ).fetchone()
    return CAPTURE if row is not None and row[0] else CAPTURE_V2


def sql_text(name: str) -> str:
    """The text of one versioned SQL file shipped in ``cdc.sql``."""
    return resources.files("cdc.sql").joinpath(name).read_text(encoding="utf-8")


def install_sql(conn: Conn, names: tuple[str, ...] = CURRENT_SQL) -> None:
    """Run versioned SQL files, idempotently, serialised by a transaction advisory lock."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (INSTALL_LOCK,))
        for name in names:
            conn.execute(sql_text(name).encode())


def install_event_log(conn: Conn, tenant: str) -> None:
    """Create ``tenant.image_events`` (idempotent)."""
    conn.execute("SELECT imgmig.install_event_log(%s)", (tenant,))


def install_log_function(conn: Conn, tenant: str, *, before: bool | None = None) -> None:
    """Write ``tenant``'s deferred-mode trigger function (idempotent, CREATE OR REPLACE).

    ``before``: whether update events keep the old array too. By default, until the
    tenant's log is complete (``checkpoint.log_complete``): before that, an update's
    ``before`` is the only copy of what the product held when capture began.
    """
    _install_function(conn, tenant, LOG_FUNCTION, before)


def install_capture_function(conn: Conn, tenant: str, *, before: bool | None = None) -> None:
    """Write ``tenant``'s inline-mode trigger function; ``before`` as for the log function."""
    _install_function(conn, tenant, CAPTURE_FUNCTION, before)


#: Each per-tenant trigger function's installer, ``imgmig.<installer>(tenant, before)``.
_INSTALLERS: Final = {
    LOG_FUNCTION: sql.Identifier("imgmig", "install_log_function"),
    CAPTURE_FUNCTION: sql.Identifier("imgmig", "install_capture_function"),
}


def _install_function(conn: Conn, tenant: str, function: str, before: bool | None) -> None:
    if before is None:
        before = not checkpoint.log_complete(conn, tenant)
    conn.execute(sql.SQL("SELECT {}(%s, %s)").format(_INSTALLERS[function]), (tenant, before))


def refresh_log_function(conn: Conn, tenant: str) -> None:
    """Rewrite ``tenant``'s capture or log function for its current log state, if in use."""
    present = installed_triggers(conn, tenant)
    if LOG_ONLY[1].name in present:
        install_log_function(conn, tenant)
    if CAPTURE[1].name in present and inline_triggers(conn) is CAPTURE:
        install_capture_function(conn, tenant)


def repoint(conn: Conn, tenant: str, specs: tuple[TriggerSpec, ...]) -> None:
    """Replace ``tenant``'s triggers named in ``specs``, where present, by ``specs``.

    One ``CREATE OR REPLACE TRIGGER`` each, under ``lock_timeout`` with retry: the trigger
    is swapped in place, so there is no instant without it (revisions 0004 and 0007).
    """
    present = installed_triggers(conn, tenant)
    for spec in specs:
        if spec.name in present:
            run_ddl(conn, spec.create(tenant, replace=True), schema=tenant)


def drop_tenant_function(conn: Conn, tenant: str, function: str) -> None:
    """Drop ``tenant``'s trigger ``function``; with no tenant's left, its installer too."""
    drop = sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(tenant, function))
    run_ddl(conn, drop, schema=tenant)
    row = conn.execute("SELECT count(*) FROM pg_proc WHERE proname = %s", (function,)).fetchone()
    if row is not None and int(row[0]) == 0:
        installer = _INSTALLERS[function]
        conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}(text, boolean)").format(installer))


def installed_triggers(conn: Conn, tenant: str) -> set[str]:
    """Names of the imgmig triggers present in ``tenant``."""
    rows = conn.execute(
        "SELECT t.tgname FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname = %s AND NOT t.tgisinternal AND t.tgname = ANY (%s)",
        (tenant, [t.name for t in ALL_TRIGGERS]),
    ).fetchall()
    return {str(r[0]) for r in rows}


def apply_stage(conn: Conn, tenant: str, stage: str) -> None:
    """Add and remove triggers so that ``tenant`` has exactly the set ``stage`` needs.

    Runs in the caller's transaction. Each DDL statement takes its lock under
    ``lock_timeout`` with a bounded retry (``cdc.ddl.run_ddl``); a statement is only
    issued when the trigger set actually changes, so re-applying a stage takes no lock.
    Which capture shape is installed follows ``imgmig.tenant_state.projection``.
    """
    projection = projection_of(conn, tenant)
    if projection == "logical" and stage == "jsonb":
        # Back at jsonb the log is incomplete; logical events carry no 'before', so the
        # tenant comes forward deferred (logical again once a new backfill is done).
        conn.execute(
            "UPDATE imgmig.tenant_state SET projection = 'deferred' WHERE tenant = %s", (tenant,)
        )
        log.warning("back at stage jsonb: logical capture ends, now deferred", tenant=tenant)
        projection = "deferred"
    if projection == "logical" and stage in TABLE_STAGES:
        raise LogicalCaptureError(
            tenant=tenant,
            reason="stage table runs the reverse sync, whose JSONB writes the WAL cannot "
            "tell from the legacy app's; switch the tenant to inline first "
            "(`imgmig project --tenant T --mode inline`)",
        )
    if projection == "deferred" and stage in TABLE_STAGES:
        raise StageRefusedError(
            tenant=tenant, stage=stage, action="project deferred",
            why="from stage table on the services write the table, and a service write "
            "to a product whose legacy write still waits in the log would be projected "
            "over it; switch the tenant to inline first (`imgmig project --tenant T "
            "--mode inline` applies what is pending)",
        )  # fmt: skip
    wanted = triggers_for(stage, projection, inline=inline_triggers(conn))
    wanted_names = {spec.name for spec in wanted}
    present = installed_triggers(conn, tenant)
    bound = log.bind(tenant=tenant, stage=stage)
    publish = projection == "logical" and stage in PUBLISHED_STAGES
    published = tenant in logical.published(conn)
    if publish and not published:
        logical.publish(conn, tenant)  # same transaction as the trigger drops below
    for spec in ALL_TRIGGERS:
        if spec.name in present and spec.name not in wanted_names:
            run_ddl(conn, spec.drop(tenant), schema=tenant)
            bound.info("trigger dropped", trigger=spec.name)
    for function in sorted({s.function for s in wanted if s.per_tenant and s.name not in present}):
        _install_function(conn, tenant, function, None)
    for spec in wanted:
        if spec.name not in present:
            run_ddl(conn, spec.create(tenant), schema=tenant)
            bound.info("trigger created", trigger=spec.name)
    if published and not publish:
        # The triggers just created hold products' lock: no write commits until this
        # transaction does, so every decoded write is logged before any the triggers log.
        if logical.slot_lost(conn):
            bound.warning(
                "capture slot lost: writes since its last drain were not logged; "
                "run `imgmig reconcile` to repair the table and log their images"
            )
        else:
            logical.drain(conn)
        logical.unpublish(conn, tenant)


def projection_of(conn: Conn, tenant: str) -> str:
    """The tenant's projection mode ('inline' when it has no control row)."""
    row = conn.execute(
        "SELECT projection FROM imgmig.tenant_state WHERE tenant = %s", (tenant,)
    ).fetchone()
    return str(row[0]) if row is not None else "inline"


def set_projection(conn: Conn, tenant: str, mode: str) -> None:
    """Switch ``tenant`` to 'inline', 'deferred' or 'logical' projection, swapping its capture.

    Caller's transaction. Going back to inline does not apply pending events by itself:
    ``cdc.project.set_mode`` projects them in the same transaction. 'logical' needs the
    slot (``cdc.logical.prepare``) and a complete event log: its update events carry no
    ``before``, so the log must already hold every product's images.
    """
    if mode not in PROJECTIONS:
        raise ValueError(f"projection mode must be one of {', '.join(PROJECTIONS)}, not {mode!r}")
    if mode == "logical" and projection_of(conn, tenant) != "logical":
        reason = logical.unavailable(conn)
        if reason is None and not checkpoint.log_complete(conn, tenant):
            reason = (
                "the tenant's event log is not complete (no finished backfill since capture "
                "began): run `imgmig backfill` first; logical events carry no 'before'"
            )
        if reason is not None:
            raise LogicalCaptureError(tenant=tenant, reason=reason)
    row = conn.execute(
        "UPDATE imgmig.tenant_state SET projection = %s WHERE tenant = %s RETURNING stage",
        (mode, tenant),
    ).fetchone()
    if row is not None:
        apply_stage(conn, tenant, str(row[0]))
