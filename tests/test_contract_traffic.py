"""Dropping products.images under live service and API traffic fails no request."""

from __future__ import annotations

import time

import httpx
import psycopg

from cdc import migrate
from cdc.demo import ApiServer
from cdc.demo_report import compare, initial_ledger
from cdc.traffic import Phase, Stats, Writer
from cdc.traffic_new_code import ApiWriter, ServiceWriter
from services import api_keys
from tests.test_contract import NOW, to_table

TENANTS = ["user_1", "user_2", "user_4", "user_5"]


def test_contract_under_service_and_api_traffic_fails_no_request(migrated_url: str) -> None:
    """Readers are on the table before the drop, so the contract and its restoring
    downgrade fail no request and lose no write (checked against the writers' ledger)."""
    to_table(migrated_url)
    with psycopg.connect(migrated_url) as conn:
        ledger = initial_ledger(conn, TENANTS)
        keys = {t: api_keys.create_key(conn, t, actor="test") for t in TENANTS}
        conn.commit()
    for entry in ledger.entries.values():  # the legacy writer is retired at this point
        if entry.owner == "legacy":
            entry.owner = "service"
    stats, phase = Stats(), Phase()
    common = {"url": migrated_url, "ledger": ledger, "phase": phase, "stats": stats}
    with ApiServer(migrated_url) as base, httpx.Client(base_url=base, timeout=30) as client:
        writers: list[Writer] = [
            ServiceWriter(name_="service", seed=11, **common),  # type: ignore[arg-type]
            ApiWriter(
                name_="api",
                seed=12,
                client=client,
                keys=keys,
                **common,  # type: ignore[arg-type]
            ),
        ]
        for writer in writers:
            writer.start()
        try:
            time.sleep(1)
            phase.set("contract")
            migrate.upgrade(migrated_url, revision=migrate.CONTRACT, options=NOW)
            time.sleep(1)
            phase.set("downgrade")
            migrate.downgrade(migrated_url, migrate.EXPAND)
            time.sleep(1)
        finally:
            for writer in writers:
                writer.stop.set()
            for writer in writers:
                writer.join(timeout=30)
    assert stats.failed == 0, dict(stats.errors)
    assert stats.latencies["contract"], "traffic ran while the column was dropped"
    assert stats.latencies["downgrade"], "traffic ran while the column came back"
    with psycopg.connect(migrated_url) as conn:
        table = compare(conn, ledger, TENANTS, side="table")
        jsonb = compare(conn, ledger, TENANTS, side="jsonb")
    assert table.clean, table.examples
    assert jsonb.clean, jsonb.examples
