"""Replay: a tenant's product_images rebuilt from its event log equals the live table."""

from __future__ import annotations

import subprocess
import sys

from cdc import events
from tests.capture_support import (
    TENANT,
    Conn,
    canonical_table,
    count,
    go,
    img,
    new_product,
    write_images,
)

A, B, C = (f"https://cdn.example/{x}.jpg" for x in "abc")


def busy_history(conn: Conn) -> None:
    """Snapshot the seed, then legacy and service writes through dual_write and table."""
    go(conn, "dual_write")
    ids = [int(r[0]) for r in conn.execute(f"SELECT id FROM {TENANT}.products").fetchall()]
    conn.execute("SELECT imgmig.snapshot(%s, %s, 'backfill')", (TENANT, ids))
    pid = new_product(conn, [img(A, 0)])
    write_images(conn, pid, [img(B, 0), img(A, 1)])
    write_images(conn, ids[0], [{"url": C}, "junk"])
    conn.execute(f"DELETE FROM {TENANT}.products WHERE id = %s", (ids[1],))
    go(conn, "table")
    conn.execute(
        f"UPDATE {TENANT}.product_images SET alt_text = 'service', is_label = true "
        "WHERE product_id = %s AND url = %s",
        (pid, A),
    )
    conn.execute(
        f"UPDATE {TENANT}.product_images SET tags = '{{t}}' WHERE product_id = %s", (ids[2],)
    )
    write_images(conn, ids[3], [img(C, 0)])


def test_replayed_table_equals_live_table(conn: Conn) -> None:
    """Rebuilding from events gives, product by product, the same canonical rows."""
    busy_history(conn)
    live = canonical_table(conn)
    with conn.transaction():
        products = events.replay(conn, TENANT)
    assert products > 0
    assert canonical_table(conn) == live


def test_replay_leaves_the_event_log_and_jsonb_alone(conn: Conn) -> None:
    """Replay appends no event and, in stage table, does not rewrite products.images."""
    busy_history(conn)
    n = count(conn, TENANT, "image_events")
    before = conn.execute(
        f"SELECT md5(string_agg(images::text, ',' ORDER BY id)) FROM {TENANT}.products"
    ).fetchone()
    with conn.transaction():
        events.replay(conn, TENANT)
    after = conn.execute(
        f"SELECT md5(string_agg(images::text, ',' ORDER BY id)) FROM {TENANT}.products"
    ).fetchone()
    assert count(conn, TENANT, "image_events") == n
    assert before == after


def test_events_reads_a_products_history(conn: Conn) -> None:
    """events() returns one product's events in log order."""
    go(conn, "dual_write")
    pid = new_product(conn, [img(A, 0)])
    write_images(conn, pid, [img(B, 0)])
    history = events.events(conn, TENANT, product_id=pid)
    assert [e.type for e in history] == ["images.inserted", "images.updated"]
    assert history[0].seq < history[1].seq


def test_replay_command(conn: Conn, migrated_url: str) -> None:
    """`imgmig replay --tenant T` rebuilds the table and says how many products it did."""
    busy_history(conn)
    live = canonical_table(conn)
    cmd = [sys.executable, "-m", "cdc", "--database-url", migrated_url, "replay", "-t", TENANT]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "rebuilt from events" in result.stdout
    assert canonical_table(conn) == live


def test_replay_keeps_the_label_decisions_no_event_carries(conn: Conn) -> None:
    """The label strategies and the review queue decide on the rows directly, and before
    stage table nothing logs it: a replay, even at stage table, keeps every decision."""
    go(conn, "dual_write")
    ids = [int(r[0]) for r in conn.execute(f"SELECT id FROM {TENANT}.products").fetchall()]
    conn.execute("SELECT imgmig.snapshot(%s, %s, 'backfill')", (TENANT, ids))
    decided = conn.execute(
        f"UPDATE {TENANT}.product_images r SET is_label = (r.product_id % 2 = 0), "
        "label_strategy = 'legacy_image_type', label_confidence = 0.9 "
        f"WHERE r.id IN (SELECT DISTINCT ON (product_id) id FROM {TENANT}.product_images "
        'WHERE NOT is_label ORDER BY product_id, "order" DESC LIMIT 12) '
        "AND NOT EXISTS (SELECT 1 FROM "
        f"{TENANT}.product_images x WHERE x.product_id = r.product_id AND x.is_label)"
    ).rowcount
    assert decided == 12
    go(conn, "table")
    decisions = (
        f'SELECT product_id, url, "order", is_label, label_strategy, label_confidence '
        f"FROM {TENANT}.product_images WHERE label_strategy IS NOT NULL ORDER BY 1, 3"
    )
    before = conn.execute(decisions).fetchall()
    with conn.transaction():
        events.replay(conn, TENANT)
    assert conn.execute(decisions).fetchall() == before
