"""Replication lag, as the primary sees it: how far its furthest WAL consumer is behind.

A backfill writes WAL at the rate of a bulk load (its rows, their indexes and one
snapshot event per product: 1.4 times what a raw INSERT ... SELECT writes per row on the
benchmark, BENCHMARKS.md). Physical standbys replay it, logical consumers (Debezium
reading the outbox) decode it, and both can fall behind: read replicas serve stale data,
and the primary keeps the WAL they still need. Like gh-ost's ``--max-lag-millis``, the
backfill waits between batches while a consumer is more than a set number of bytes
behind.

Lag is measured in bytes, from ``pg_stat_replication``: for each WAL sender, the distance
from ``pg_current_wal_lsn()`` to what its client reports as replayed (physical standby)
or confirmed (logical consumer), else flushed or written. A client that has not
reported yet (a logical consumer's first report comes a status interval after it
connects) counts from its replication slot's confirmed position, else from the slot's
restart point, and only without a slot from what its sender has sent: the sent
position goes on moving while the client stands still (a stopped ``pg_recvlogical``
took the backfill past its limit that way in a test). Bytes rather than
``replay_lag``: the time columns are NULL while nothing is in flight and are an estimate,
and a byte distance says directly how much WAL the consumer has yet to apply. The client
reports its position when it receives WAL and at least every
``wal_receiver_status_interval`` (10 s by default), so a consumer that has caught up
while the primary is quiet is seen within that interval.

The LSN columns are visible only to superusers and members of ``pg_read_all_stats``;
for any other role they are NULL. :func:`furthest` then finds no lag, and
:func:`unseen` counts the senders it could not measure, so the backfill can say so
instead of silently not throttling.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from psycopg import sql

from cdc.db import Conn

DEFAULT_MAX_LAG: Final = 256 * 2**20  # bytes

_FURTHEST: Final = sql.SQL(
    """SELECT coalesce(nullif(r.application_name, ''), 'pid ' || r.pid),
              pg_wal_lsn_diff(pg_current_wal_lsn(),
                              coalesce(r.replay_lsn, r.flush_lsn, r.write_lsn,
                                       s.confirmed_flush_lsn, s.restart_lsn,
                                       r.sent_lsn))::bigint
         FROM pg_stat_replication r
         LEFT JOIN pg_replication_slots s ON s.active_pid = r.pid
        WHERE coalesce(r.replay_lsn, r.flush_lsn, r.write_lsn, r.sent_lsn) IS NOT NULL
          AND r.application_name <> ALL (%s::text[])
        ORDER BY 2 DESC
        LIMIT 1"""
)

_UNSEEN: Final = sql.SQL(
    """SELECT CASE WHEN pg_has_role(current_user, 'pg_read_all_stats', 'USAGE') THEN 0
                   ELSE (SELECT count(*) FROM pg_stat_replication) END"""
)


@dataclass(frozen=True)
class Lag:
    """The furthest WAL consumer: its ``application_name`` and how many bytes behind."""

    consumer: str
    bytes: int

    def __str__(self) -> str:
        return f"{self.consumer} is {self.bytes / 2**20:,.1f} MiB behind"


def furthest(conn: Conn, ignore: Sequence[str] = ()) -> Lag | None:
    """The consumer furthest behind, or None when there is none this role can see.

    ``ignore``: application names not to count, such as a delayed standby
    (``recovery_min_apply_delay``), which is behind by design.
    """
    row = conn.execute(_FURTHEST, (list(ignore),)).fetchone()
    if row is None:
        return None
    return Lag(str(row[0]), max(0, int(row[1])))


def unseen(conn: Conn) -> int:
    """WAL senders whose position this role cannot read (it lacks ``pg_read_all_stats``)."""
    row = conn.execute(_UNSEEN).fetchone()
    return int(row[0]) if row else 0
