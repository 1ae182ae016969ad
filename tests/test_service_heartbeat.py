"""Reader heartbeats: a stage change is reported at once, a steady stage now and then."""

from __future__ import annotations

from cdc.stage import Stage
from services.heartbeat import Heartbeat
from tests.cutover_helpers import PG


def _beats(conn: PG) -> list[tuple[object, ...]]:
    return conn.execute(
        "SELECT instance, tenant, stage, seen_at FROM imgmig.reader_heartbeats ORDER BY tenant"
    ).fetchall()


def test_heartbeat_reports_changes_at_once_and_steady_stages_per_interval(
    conn: PG, migrated_url: str
) -> None:
    """Same stage within the interval: no write; new stage or interval passed: a write."""
    now = [0.0]
    beat = Heartbeat(migrated_url, instance="host:1", interval=10, clock=lambda: now[0])
    try:
        beat.beat("user_1", Stage.JSONB)
        first = _beats(conn)
        assert [row[:3] for row in first] == [("host:1", "user_1", "jsonb")]
        now[0] = 5
        beat.beat("user_1", Stage.JSONB)
        assert _beats(conn) == first
        beat.beat("user_1", Stage.TABLE)
        assert [row[2] for row in _beats(conn)] == ["table"]
        now[0] = 16
        beat.beat("user_1", Stage.TABLE)
        assert _beats(conn)[0][3] != first[0][3]
    finally:
        beat.close()
