"""Triggerless capture: the legacy writes read back from the WAL by logical decoding.

Projection mode ``logical`` is deferred mode without the trigger. A tenant's
``products (id, images)`` is in the publication ``imgmig_capture``; the database's one
``pgoutput`` slot (:func:`slot_name`) keeps the WAL of every committed write until
:func:`drain` has turned it into the same ``image_events`` rows the deferred trigger
would have written. Then the deferred projector applies them as usual
(``cdc.project.project`` drains first). A legacy write pays for nothing but its WAL.

Exactly once: each drain peeks at the slot (``pg_logical_slot_peek_binary_changes``,
which does not consume), writes the events and ``imgmig.logical_checkpoint`` in one
transaction, and only after the commit advances the slot. A crash between the two
re-reads transactions the checkpoint says are done, and skips them.

What an event holds here that the trigger's does not: ``at`` is the writer's commit
time, ``payload.wal`` its transaction id and commit position. What it lacks: an update or
a delete carries no ``before`` (the WAL holds only the key of the old row; the product's
previous event holds its images). Which writes changed ``images`` is not in the WAL
either (an UPDATE of another column carries the unchanged array): the reader keeps a
digest of each product's last logged array (``imgmig.logical_seen``) and logs only a
change. The first write of a product it has not seen yet is logged even if it repeats
the array. The source is ``legacy`` unless the transaction said otherwise with a
transactional ``pg_logical_emit_message`` (prefix ``imgmig.source``), as the service does.

Switching a tenant in or out happens in ``cdc.capture.apply_stage``. In: the table
joins the publication in the same transaction that drops the deferred trigger, so every
commit is captured by exactly one of them. Out: the new triggers are created first (their
lock waits for in-flight writers and holds off new ones), then the slot is drained inside
that transaction, then the table leaves the publication: no decoded write can land in the
log after a trigger's newer event.

Needs ``wal_level = logical`` and a role with REPLICATION (or superuser); ARCHITECTURE.md
and docs/runbook.md say how to bound the WAL a stalled slot keeps
(``max_slot_wal_keep_size``).
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

import psycopg
import structlog
from psycopg import sql

from cdc import pgoutput
from cdc.db import Conn
from cdc.ddl import run_ddl
from cdc.errors import LogicalCaptureError

log = structlog.get_logger(__name__)

PUBLICATION: Final = "imgmig_capture"
SOURCE_PREFIX: Final = "imgmig.source"
SOURCES: Final = frozenset({"legacy", "service", "backfill", "reconcile"})
#: Messages per peek in autocommit drains (one transaction each; about three per write).
#: Measured (scratch, 41,000 writes): 5,000 drained 9,000 writes/s, 20,000 11,500/s.
CHUNK: Final = 20_000
DRAIN_LOCK: Final = "imgmig.logical.drain"
#: How long creating the slot may wait for the transactions running at that moment.
SLOT_WAIT_S: Final = 60
_PEEK: Final = (
    "SELECT data FROM pg_logical_slot_peek_binary_changes(%s, NULL, %s, "
    "'proto_version', '1', 'publication_names', %s, 'messages', 'true')"
)


@dataclass(frozen=True)
class RowChange:
    """One write to a tenant's products, as decoded."""

    tenant: str
    op: str  # 'inserted' | 'updated' | 'deleted'
    product_id: int
    images: str | None  # jsonb text; None when deleted or SQL NULL
    unchanged: bool = False  # an UPDATE that left a TOASTed array as it was


@dataclass
class Txn:
    """One committed transaction of the slot, with the changes we publish."""

    xid: int
    commit_time: datetime
    source: str = "legacy"
    end_lsn: int = 0
    changes: list[RowChange] = field(default_factory=list)


@dataclass(frozen=True)
class Drained:
    """What one :func:`drain` did: transactions that wrote products, events logged,
    writes skipped as not changing ``images``, and the slot position reached."""

    transactions: int
    events: int
    unchanged: int
    lsn: str | None


@dataclass(frozen=True)
class SlotLag:
    """The slot's distance from the WAL's end; ``status`` is pg_replication_slots.wal_status."""

    bytes: int
    status: str | None


# --- availability and set-up -----------------------------------------------------------


def slot_name(conn: Conn) -> str:
    """The database's capture slot: ``imgmig_<database>_<hash>``. Slot names are
    cluster-wide, publications per database; the hash keeps two databases whose names
    differ only in characters a slot name cannot hold apart."""
    database = conn.info.dbname
    readable = re.sub(r"[^a-z0-9_]", "_", database.lower())[:40]
    digest = hashlib.md5(database.encode(), usedforsecurity=False).hexdigest()[:8]
    return f"imgmig_{readable}_{digest}"


def unavailable(conn: Conn) -> str | None:
    """Why logical capture cannot run on this server, or None."""
    row = conn.execute(
        "SELECT current_setting('wal_level'), r.rolreplication OR r.rolsuper "
        "FROM pg_roles r WHERE r.rolname = current_user"
    ).fetchone()
    if row is None:
        return "the current role is not in pg_roles"
    if row[0] != "logical":
        return f"wal_level is {row[0]!r}; logical capture needs 'logical' (a server restart)"
    if not row[1]:
        return "the role needs the REPLICATION attribute (or superuser) to read a slot"
    return None


def slot_exists(conn: Conn) -> bool:
    row = conn.execute(
        "SELECT 1 FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()",
        (slot_name(conn),),
    ).fetchone()
    return row is not None


def prepare(conn: Conn, *, wait_s: int = SLOT_WAIT_S) -> bool:
    """Create the publication and the slot if missing; True when the slot was created.

    ``conn`` must be in autocommit mode, outside a transaction: a slot cannot be created
    in a transaction that has written. The publication comes first: a slot decodes
    nothing written before a publication it names existed. Creating the slot waits for
    the transactions running at that moment to end, ``wait_s`` at most.
    """
    if not conn.autocommit or _in_transaction(conn):
        raise ValueError("logical.prepare needs an autocommit connection, outside a transaction")
    reason = unavailable(conn)
    if reason is not None:
        raise LogicalCaptureError(reason=reason)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (DRAIN_LOCK,))
        found = conn.execute("SELECT 1 FROM pg_publication WHERE pubname = %s", (PUBLICATION,))
        if found.fetchone() is None:
            conn.execute(
                sql.SQL("CREATE PUBLICATION {} WITH (publish = 'insert, update, delete')").format(
                    sql.Identifier(PUBLICATION)
                )
            )
    if slot_exists(conn):
        return False
    # A new slot waits for every transaction running now to end: bounded, and named.
    conn.execute(sql.SQL("SET statement_timeout = {}").format(f"{wait_s * 1000}ms"))
    try:
        conn.execute(
            "SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot_name(conn),)
        )
    except psycopg.errors.QueryCanceled as exc:
        oldest = conn.execute(
            "SELECT pid, now() - xact_start FROM pg_stat_activity "
            "WHERE xact_start IS NOT NULL AND pid <> pg_backend_pid() "
            "ORDER BY xact_start LIMIT 1"
        ).fetchone()
        who = f"pid {oldest[0]}, open for {oldest[1]}" if oldest else "gone by now"
        raise LogicalCaptureError(
            reason=f"creating the slot waits for every running transaction to end; one "
            f"did not within {wait_s} s ({who}); retry when it has"
        ) from exc
    finally:
        conn.execute("RESET statement_timeout")
    conn.execute("DELETE FROM imgmig.logical_checkpoint WHERE slot = %s", (slot_name(conn),))
    log.info("logical capture slot created", slot=slot_name(conn), publication=PUBLICATION)
    return True


def published(conn: Conn) -> set[str]:
    """Tenants whose products table is in the publication."""
    rows = conn.execute(
        "SELECT schemaname FROM pg_publication_tables "
        "WHERE pubname = %s AND tablename = 'products'",
        (PUBLICATION,),
    ).fetchall()
    return {str(r[0]) for r in rows}


def publish(conn: Conn, tenant: str) -> None:
    """Add the tenant's ``products (id, images)`` to the publication (caller's transaction)."""
    if not slot_exists(conn):
        raise LogicalCaptureError(
            reason="no capture slot in this database; run `imgmig project --mode logical`, "
            "which creates it, rather than setting the mode by hand"
        )
    # serialised with drop_slot_if_unused: the slot cannot go while a tenant joins
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (DRAIN_LOCK,))
    if tenant in published(conn):
        return
    stmt = sql.SQL("ALTER PUBLICATION {} ADD TABLE {} (id, images)").format(
        sql.Identifier(PUBLICATION), sql.Identifier(tenant, "products")
    )
    run_ddl(conn, stmt, schema=tenant)
    log.info("tenant published for logical capture", tenant=tenant)


def unpublish(conn: Conn, tenant: str) -> None:
    """Take the tenant's products out of the publication and forget its digests."""
    if tenant not in published(conn):
        return
    stmt = sql.SQL("ALTER PUBLICATION {} DROP TABLE {}").format(
        sql.Identifier(PUBLICATION), sql.Identifier(tenant, "products")
    )
    run_ddl(conn, stmt, schema=tenant)
    conn.execute("DELETE FROM imgmig.logical_seen WHERE tenant = %s", (tenant,))
    log.info("tenant left logical capture", tenant=tenant)


def drop_slot_if_unused(conn: Conn) -> bool:
    """Drop the slot once no tenant is published, after draining what it holds.

    Outside any transaction. A slot nobody reads keeps WAL forever, so the last tenant
    to leave logical mode takes it away (``imgmig project`` calls this).
    """
    if not slot_exists(conn) or published(conn):
        return False
    if not slot_lost(conn):
        drain(conn)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (DRAIN_LOCK,))
        if published(conn) or not slot_exists(conn):  # a tenant joined meanwhile
            return False
        conn.execute("SELECT pg_drop_replication_slot(%s)", (slot_name(conn),))
        conn.execute("DELETE FROM imgmig.logical_checkpoint WHERE slot = %s", (slot_name(conn),))
    log.info("logical capture slot dropped: no tenant uses it", slot=slot_name(conn))
    return True


def _flush_wal(conn: Conn) -> None:
    """Make every commit so far decodable: commit a transaction that has written WAL
    (a transactional message), synchronously: its commit flushes the WAL up to it. (A
    transaction that only took an id commits asynchronously whatever the setting.)

    A peek decodes only up to the flush position, and with ``synchronous_commit = off``
    a commit is visible before its WAL is flushed. A tenant leaving logical mode drains
    inside its switch transaction, so the flush is done on a second connection there.
    """
    if _in_transaction(conn):
        info = conn.info
        with psycopg.connect(info.dsn, password=info.password, autocommit=True) as other:
            _flush_wal(other)
        return
    with conn.transaction():
        conn.execute("SET LOCAL synchronous_commit = on")
        conn.execute("SELECT pg_logical_emit_message(true, 'imgmig.flush', '')")


def _in_transaction(conn: Conn) -> bool:
    return conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE


def slot_lost(conn: Conn) -> bool:
    """Has the server invalidated the slot (``max_slot_wal_keep_size``)? Its unread WAL
    is gone: writes since its last drain were not captured."""
    status = lag(conn)
    return status is not None and status.status == "lost"


def lag(conn: Conn) -> SlotLag | None:
    """How much WAL the slot has not confirmed yet; None without a slot."""
    row = conn.execute(
        "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), confirmed_flush_lsn)::bigint, "
        "wal_status "
        "FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()",
        (slot_name(conn),),
    ).fetchone()
    if row is None:
        return None
    return SlotLag(bytes=int(row[0] or 0), status=row[1])


# --- reading the slot ------------------------------------------------------------------


def transactions(messages: Iterable[bytes]) -> Iterator[Txn]:
    """Whole transactions from a stream of pgoutput messages, in commit order."""
    relations: dict[int, pgoutput.Relation] = {}
    txn: Txn | None = None
    for data in messages:
        msg = pgoutput.parse(data)
        if isinstance(msg, pgoutput.Relation):
            relations[msg.relid] = msg
        elif isinstance(msg, pgoutput.Begin):
            txn = Txn(xid=msg.xid, commit_time=msg.commit_time)
        elif isinstance(msg, pgoutput.Commit):
            if txn is None:
                raise pgoutput.ProtocolError("COMMIT without BEGIN")
            txn.end_lsn = msg.end_lsn
            yield txn
            txn = None
        elif isinstance(msg, pgoutput.Message):
            content = msg.content.decode(errors="replace")
            if txn is not None and msg.prefix == SOURCE_PREFIX and content in SOURCES:
                txn.source = content
        elif isinstance(msg, pgoutput.Change) and txn is not None:
            change = _row_change(relations[msg.relid], msg)
            if change is not None:
                txn.changes.append(change)


def _row_change(rel: pgoutput.Relation, msg: pgoutput.Change) -> RowChange | None:
    if rel.name != "products":
        return None
    row = msg.new if msg.new is not None else msg.old
    if row is None:
        return None
    values = dict(zip(rel.columns, row, strict=True))
    product_id = values.get("id")
    if not isinstance(product_id, str):
        raise pgoutput.ProtocolError(f"{rel.namespace}.products change without its id")
    images = values.get("images") if msg.op != "delete" else None
    op = {"insert": "inserted", "update": "updated", "delete": "deleted"}[msg.op]
    text = images if isinstance(images, str) else None
    return RowChange(rel.namespace, op, int(product_id), text, images is pgoutput.UNCHANGED)


def _checkpoint(conn: Conn) -> int:
    row = conn.execute(
        "SELECT lsn::text FROM imgmig.logical_checkpoint WHERE slot = %s", (slot_name(conn),)
    ).fetchone()
    return pgoutput.lsn_int(str(row[0])) if row is not None else 0


def drain(conn: Conn, *, chunk: int = CHUNK) -> Drained:
    """Move every decoded write from the slot into the tenants' event logs.

    Outside a transaction: chunks of ``chunk`` messages, one transaction each, the slot
    advanced after each commit. Inside the caller's transaction (a tenant leaving logical
    mode): everything in one peek, and the slot is advanced by the next autocommit drain
    (the checkpoint written here makes that one skip what this one logged).
    """
    inside = _in_transaction(conn)
    # every query in a transaction block: on an idle connection without autocommit a bare
    # query would open a transaction that the slot advance below does not wait for
    with conn.transaction():
        exists = slot_exists(conn)
        lost = exists and slot_lost(conn)
    if not exists:
        return Drained(0, 0, 0, None)
    if lost:
        raise LogicalCaptureError(
            reason=f"the slot {slot_name(conn)} lost WAL it had not read (max_slot_wal_keep_size): "
            "writes since its last drain were not captured; switch its tenants to deferred "
            "(`imgmig project --mode deferred`) and run `imgmig reconcile` to repair"
        )
    _flush_wal(conn)
    total_txns = total_events = total_same = 0
    last: int | None = None
    while True:
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (DRAIN_LOCK,))
            done = _checkpoint(conn)
            # flushed, not written: a peek decodes only up to the flush position, and a
            # commit between the two would be skipped by the advance to `upto` below
            end = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
            upto = pgoutput.lsn_int(str(end[0])) if end else 0
            limit = None if inside else chunk
            rows = conn.execute(_PEEK, (slot_name(conn), limit, PUBLICATION)).fetchall()
            txns = list(transactions(bytes(r[0]) for r in rows))
            fresh = [t for t in txns if t.end_lsn > done]
            events, same = _log(conn, fresh)
            full = limit is not None and len(rows) >= limit
            # a short peek read everything up to `upto`: nothing before it is left
            reached = max([done, *(t.end_lsn for t in txns)] + ([] if full else [upto]))
            conn.execute(
                "INSERT INTO imgmig.logical_checkpoint (slot, lsn, drained_at) "
                "VALUES (%s, %s::pg_lsn, now()) ON CONFLICT (slot) DO UPDATE "
                "SET lsn = greatest(logical_checkpoint.lsn, excluded.lsn), drained_at = now()",
                (slot_name(conn), pgoutput.lsn_text(reached)),
            )
        total_txns += sum(1 for t in fresh if t.changes)
        total_events += events
        total_same += same
        last = reached
        if inside:
            break
        with conn.transaction():
            conn.execute(
                "SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                (slot_name(conn), pgoutput.lsn_text(reached)),
            )
        if not full:
            break
    drained = Drained(total_txns, total_events, total_same, pgoutput.lsn_text(last or 0))
    if total_txns:
        log.info(
            "drained logical capture slot",
            transactions=total_txns,
            events=total_events,
            unchanged=total_same,
            lsn=drained.lsn,
        )
    return drained


def _digest(images: str) -> uuid.UUID:
    return uuid.UUID(bytes=hashlib.md5(images.encode(), usedforsecurity=False).digest())


def _log(conn: Conn, txns: list[Txn]) -> tuple[int, int]:
    """Write the events of ``txns``; returns (events written, unchanged writes skipped)."""
    by_tenant: dict[str, list[tuple[Txn, RowChange]]] = {}
    for txn in txns:
        for change in txn.changes:
            by_tenant.setdefault(change.tenant, []).append((txn, change))
    written = skipped = 0
    for tenant, items in by_tenant.items():
        ids = sorted({c.product_id for _, c in items})
        rows = conn.execute(
            "SELECT product_id, digest FROM imgmig.logical_seen "
            "WHERE tenant = %s AND product_id = ANY (%s::bigint[])",
            (tenant, ids),
            binary=True,
        ).fetchall()
        seen: dict[int, uuid.UUID | None] = {int(r[0]): r[1] for r in rows}
        known = set(seen)
        events: list[tuple[str, str, str, str, str, datetime]] = []
        for txn, change in items:
            if change.unchanged:
                skipped += 1  # an unchanged TOASTed array: another column was written
                continue
            live = change.op != "deleted"
            digest = _digest(change.images or "null") if live else None
            if change.op == "updated" and seen.get(change.product_id, 0) == digest:
                skipped += 1
                continue
            seen[change.product_id] = digest
            events.append(
                (
                    str(change.product_id),
                    f"images.{change.op}",
                    _payload(txn, change),
                    tenant,
                    txn.source,
                    txn.commit_time,
                )
            )
        if events:
            # COPY, in log order: array parameters of JSON text cost more to escape than
            # everything else a drain does (measured: 7 of 15 s)
            copy = sql.SQL(
                "COPY {} (aggregateid, type, payload, tenant, source, at) FROM STDIN"
            ).format(sql.Identifier(tenant, "image_events"))
            with conn.cursor() as cur, cur.copy(copy) as rows_in:
                for event in events:
                    rows_in.write_row(event)
            written += len(events)
        _remember(conn, tenant, seen, known)
    return written, skipped


def _payload(txn: Txn, change: RowChange) -> str:
    """The event's payload as JSON text, the array spliced in as the WAL gave it (jsonb's
    own output, so valid JSON; the column parses it again)."""
    after = change.images if change.images is not None else "null"
    wal = json.dumps({"xid": txn.xid, "lsn": pgoutput.lsn_text(txn.end_lsn)})
    if change.op == "updated":  # no 'before', as the trigger's once the log is complete
        return f'{{"op": "updated", "after": {after}, "wal": {wal}}}'
    if change.op == "inserted":
        return f'{{"op": "inserted", "before": null, "after": {after}, "wal": {wal}}}'
    return f'{{"op": "deleted", "before": null, "after": null, "wal": {wal}}}'


def _remember(conn: Conn, tenant: str, seen: dict[int, uuid.UUID | None], known: set[int]) -> None:
    """Store the digests: upsert the live products, forget the deleted ones."""
    live = [(pid, d) for pid, d in seen.items() if d is not None]
    gone = [pid for pid, d in seen.items() if d is None and pid in known]
    if live:
        conn.execute(
            "INSERT INTO imgmig.logical_seen (tenant, product_id, digest) "
            "SELECT %s, s.pid, s.digest FROM unnest(%s::bigint[], %s::uuid[]) AS s(pid, digest) "
            "ON CONFLICT (tenant, product_id) DO UPDATE SET digest = excluded.digest",
            (tenant, [p for p, _ in live], [d for _, d in live]),
            binary=True,
        )
    if gone:
        conn.execute(
            "DELETE FROM imgmig.logical_seen WHERE tenant = %s AND product_id = ANY (%s::bigint[])",
            (tenant, gone),
            binary=True,
        )
