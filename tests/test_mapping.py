"""The one canonical mapping between a JSONB images array and product_images rows."""

from __future__ import annotations

from calendar import monthrange
from datetime import datetime
from typing import Any

import pytest
from psycopg.types.json import Jsonb

from cdc.capture import CAPTURE, CAPTURE_V2, LOG_ONLY, REVERSE
from tests.capture_support import TENANT, Conn, go, img, in_sync, new_product

CANONICAL = [
    img("https://cdn.example/a.jpg", 0),
    img("https://cdn.example/b.jpg", 1, is_label=True, alt_text="price tag", tags=["label"]),
    img(
        "https://cdn.example/c.jpg",
        2,
        mime_type="image/jpeg",
        file_size=12345,
        width=800,
        height=600,
        vendor={"k": [1, None]},
    ),
]


def canonical(conn: Conn, images: Any) -> Any:
    row = conn.execute("SELECT imgmig.images_canonical(%s)", (Jsonb(images),)).fetchone()
    assert row is not None
    return row[0]


def mapped(conn: Conn, images: Any) -> list[tuple[Any, ...]]:
    return conn.execute(
        'SELECT url, "order", is_label, alt_text, tags, width, created_at IS NULL, extra '
        "FROM imgmig.images_to_rows(%s)",
        (Jsonb(images),),
    ).fetchall()


def problems(conn: Conn, images: Any) -> list[str] | None:
    row = conn.execute("SELECT imgmig.images_problems(%s)", (Jsonb(images),)).fetchone()
    assert row is not None
    return row[0]  # type: ignore[no-any-return]


def test_canonical_array_round_trips_unchanged(conn: Conn) -> None:
    """JSONB -> rows -> JSONB is the identity on a canonical array with every key."""
    assert canonical(conn, CANONICAL) == CANONICAL


@pytest.mark.parametrize(
    "element",
    [
        {"url": "u", "order": 0, "created_at": "2025-03-01T12:00:00Z"},
        {"url": "u", "order": 0, "created_at": "2025-02-30T12:00:00.000000Z"},
        {"url": "u", "order": 0, "created_at": 12},
        {"url": "u", "order": 0},
        {"url": "u", "order": 0, "is_label": False, "tags": [], "alt_text": None},
        {"url": "u", "order": 0, "width": "800", "height": 0, "file_size": -1, "tags": [1]},
        {"url": "u", "order": 0, "created_at": "2025-03-01T12:00:00.000000Z", "x": {"y": None}},
    ],
)
def test_odd_elements_round_trip_losslessly(conn: Conn, element: dict[str, Any]) -> None:
    """Odd timestamps, defaults, wrong types and unknown keys survive the round trip."""
    assert canonical(conn, [element]) == [element]


def test_missing_and_duplicate_orders_are_normalised(conn: Conn) -> None:
    """Orders sort by (order, array position); missing order counts as the position."""
    images = [
        {"url": "c", "order": 5},
        {"url": "a", "order": 0},
        {"url": "b"},  # position 2
        {"url": "d", "order": 0},
    ]
    assert [(r[0], r[1]) for r in mapped(conn, images)] == [("a", 0), ("d", 1), ("b", 2), ("c", 3)]
    assert problems(conn, images) == ["order_duplicate", "order_missing", "order_renumbered"]


def test_second_label_is_demoted_but_kept_in_extra(conn: Conn) -> None:
    """At most one row is a label; the raw flag of the others stays in extra."""
    images = [
        {"url": "a", "order": 0, "is_label": True},
        {"url": "b", "order": 1, "is_label": True},
    ]
    rows = mapped(conn, images)
    assert [r[2] for r in rows] == [True, False]
    assert rows[1][7]["is_label"] is True
    assert canonical(conn, images) == images
    assert problems(conn, images) == ["multiple_labels"]


def test_created_at_text_is_parsed_only_when_canonical(conn: Conn) -> None:
    """A canonical timestamp lands in the column; others keep their raw text in extra."""
    rows = mapped(conn, [img("a", 0), {"url": "b", "order": 1, "created_at": "yesterday"}])
    assert (rows[0][6], rows[0][7]) == (False, {})
    assert (rows[1][6], rows[1][7]) == (True, {"created_at": "yesterday"})


def test_rows_to_jsonb_to_rows_keeps_table_metadata(conn: Conn) -> None:
    """rows -> JSONB -> rows gives back every mapped column of a rich row."""
    pid = new_product(conn, [])
    conn.execute(
        f'INSERT INTO {TENANT}.product_images (product_id, url, "order", is_label, alt_text, '
        "tags, mime_type, file_size, width, height, extra, created_at) VALUES "
        "(%s, 'https://x/1.jpg', 0, true, 'tag', '{a,b}', 'image/png', 10, 20, 30, "
        "'{\"k\": 1}', '2024-01-02 03:04:05.123456+00')",
        (pid,),
    )
    back = conn.execute(
        'SELECT m.url, m."order", m.is_label, m.alt_text, m.tags, m.mime_type, m.file_size, '
        "m.width, m.height, m.extra, m.created_at = r.created_at "
        "FROM imgmig.rows_images(%s, ARRAY[%s::bigint]) x, imgmig.images_to_rows(x.images) m, "
        f"{TENANT}.product_images r WHERE r.product_id = %s",
        (TENANT, pid, pid),
    ).fetchall()
    assert back == [
        ("https://x/1.jpg", 0, True, "tag", ["a", "b"], "image/png", 10, 20, 30, {"k": 1}, True)
    ]


def test_seeded_products_hash_equal_on_both_sides_after_snapshot(conn: Conn) -> None:
    """After projecting the (messy) seed, verify's two hashes agree for every product."""
    ids = [int(r[0]) for r in conn.execute(f"SELECT id FROM {TENANT}.products").fetchall()]
    conn.execute("SELECT imgmig.snapshot(%s, %s, 'backfill')", (TENANT, ids))
    assert all(in_sync(conn, pid) for pid in ids)


@pytest.mark.parametrize(
    ("images", "expected"),
    [
        ([img("a", 0), img("b", 1)], None),
        ([], None),
        ({"url": "a"}, ["not_array"]),
        (None, ["null"]),
        ([img("a", 0), "junk"], ["element_not_object"]),
        ([img("a", 0), {"order": 1}], ["element_without_url"]),
        ([{"url": "a", "order": 1}], ["order_renumbered"]),
    ],
)
def test_problem_codes(conn: Conn, images: Any, expected: list[str] | None) -> None:
    """images_problems names what is wrong with an array, and nothing for a clean one."""
    assert problems(conn, images) == expected


def test_row_trigger_statement_golden() -> None:
    """The deferred-mode trigger fires only when images really change."""
    assert LOG_ONLY[1].create("user_2").as_string(None) == (
        'CREATE TRIGGER "imgmig_log_upd" AFTER UPDATE OF images ON "user_2"."products" '
        "FOR EACH ROW WHEN (OLD.images IS DISTINCT FROM NEW.images) "
        'EXECUTE FUNCTION "user_2"."imgmig_log_products_row"()'
    )
    assert (
        LOG_ONLY[1]
        .create("user_2", replace=True)
        .as_string(None)
        .startswith('CREATE OR REPLACE TRIGGER "imgmig_log_upd" AFTER UPDATE OF images')
    )


def test_trigger_statements_golden() -> None:
    """The generated trigger DDL is exactly what we expect (no DB needed to compose it)."""
    upd = CAPTURE[1].create("user_1")
    upd_v2 = CAPTURE_V2[1].create("user_1")
    rev = REVERSE[2].drop("user_1")
    assert upd.as_string(None) == (
        'CREATE TRIGGER "imgmig_capture_upd" AFTER UPDATE OF images ON "user_1"."products" '
        "FOR EACH ROW WHEN (OLD.images IS DISTINCT FROM NEW.images) "
        'EXECUTE FUNCTION "user_1"."imgmig_capture_products_row"()'
    )
    assert upd_v2.as_string(None) == (
        'CREATE TRIGGER "imgmig_capture_upd" AFTER UPDATE ON "user_1"."products" '
        "REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows "
        'FOR EACH STATEMENT EXECUTE FUNCTION "imgmig"."capture_products"()'
    )
    assert rev.as_string(None) == (
        'DROP TRIGGER IF EXISTS "imgmig_reverse_del" ON "user_1"."product_images"'
    )


def test_capture_needs_a_stage(conn: Conn) -> None:
    """Without a capture stage, a legacy write is not projected."""
    pid = new_product(conn, [img("a", 0)])
    assert conn.execute(
        f"SELECT count(*) FROM {TENANT}.product_images WHERE product_id = %s", (pid,)
    ).fetchone() == (0,)
    go(conn, "dual_write")
    assert in_sync(conn, pid) is False


def test_created_at_exists_exactly_when_the_calendar_has_the_day(conn: Conn) -> None:
    """parse_created_at (v2 skips the date check for days 01-28) accepts a day exactly
    when the month has it: days 28-31 of every month of a leap and a common year."""
    cases = [
        (f"{year}-{month:02d}-{day:02d}T23:59:59.999999Z", day <= monthrange(year, month)[1])
        for year in (2024, 2025)
        for month in range(1, 13)
        for day in (1, 28, 29, 30, 31)
    ]
    cases += [("2025-02-28T00:00:00Z", True), ("2025-02-28T00:00:00.1Z", True),
              ("2025-02-28 00:00:00Z", False), ("2025-02-28T24:00:00Z", False),
              ("2025-13-28T00:00:00Z", False), ("2025-00-10T00:00:00Z", False),
              ("0999-01-01T00:00:00Z", False), ("2025-02-28T00:00:00+01:00", False)]  # fmt: skip
    rows = conn.execute(
        "SELECT c.text, imgmig.parse_created_at(to_jsonb(c.text)) "
        "FROM unnest(%s::text[]) AS c(text)",
        ([text for text, _ in cases],),
    ).fetchall()
    parsed = dict(rows)
    for text, exists in cases:
        assert (parsed[text] is not None) == exists, text
        if exists:
            assert parsed[text] == datetime.fromisoformat(text.replace("Z", "+00:00")), text
    for not_a_string in ("20250228", "null", "{}", '["2025-02-28T00:00:00Z"]'):
        row = conn.execute("SELECT imgmig.parse_created_at(%s::jsonb)", (not_a_string,)).fetchone()
        assert row == (None,)
