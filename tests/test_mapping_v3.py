"""Mappings v3 and v4: images_to_rows returns v2's rows for every input.

The installed mapping (mapping_v4.sql over mapping_v3.sql) is compared with v2, which is
installed beside it, in a scratch schema, from the frozen files themselves, and both
map the same arrays: generated ones (mostly the legacy shape v3 short-cuts, each with the
perturbations that must send it down v2's path) and the boundaries of the short cut.
"""

from __future__ import annotations

import string
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from psycopg.types.json import Jsonb

from cdc import migrate
from cdc.capture import sql_text
from tests.capture_support import TENANT, Conn

V2_SCHEMA = "mapv2"


@pytest.fixture
def v2(conn: Conn) -> Conn:
    """``conn`` with mapping v2 (mapping_v1.sql, then mapping_v2.sql) in schema mapv2."""
    for name in ("mapping_v1.sql", "mapping_v2.sql"):
        text = sql_text(name).replace("imgmig.", f"{V2_SCHEMA}.")
        conn.execute(
            text.replace(
                "SCHEMA IF NOT EXISTS imgmig", f"SCHEMA IF NOT EXISTS {V2_SCHEMA}"
            ).encode()
        )
    conn.commit()
    return conn


def differing(conn: Conn, arrays: list[Any]) -> list[tuple[Any, Any, Any]]:
    """The arrays (with both results) whose rows differ between v2 and v3."""
    rows = conn.execute(
        "SELECT a.x, ARRAY(SELECT m::text FROM imgmig.images_to_rows(a.x) m), "
        "       ARRAY(SELECT m::text FROM mapv2.images_to_rows(a.x) m) "
        "FROM jsonb_array_elements(%s) AS a(x)",
        (Jsonb(arrays),),
    ).fetchall()
    return [(x, v3, v2) for x, v3, v2 in rows if v3 != v2]


def stamp(*fields: int | str) -> str:
    """YYYY-MM-DDTHH:MI:SS<frac>Z from (year, month, day, hour, minute, second, frac)."""
    y, mo, d, h, mi, s, frac = fields
    return f"{y:04d}-{mo:02d}-{d:02d}T{h:02d}:{mi:02d}:{s:02d}{frac}Z"


# jsonb holds no NUL character.
JSONB_TEXT = st.characters(blacklist_characters="\x00")


def stamps(
    bounds: tuple[tuple[int, int], ...], fraction: st.SearchStrategy[str]
) -> st.SearchStrategy[str]:
    """Timestamps whose six fields are drawn within ``bounds``, then ``fraction``."""
    return st.builds(stamp, *(st.integers(low, high) for low, high in bounds), fraction)


# created_at: mostly the legacy app's exact form, sometimes anything near it.
canonical_stamps = stamps(
    ((1000, 9999), (1, 12), (1, 31), (0, 23), (0, 59), (0, 59)),
    st.integers(0, 999_999).map(lambda us: f".{us:06d}"),
)
near_stamps = stamps(
    ((0, 9999), (0, 13), (0, 32), (0, 25), (0, 61), (0, 61)),
    st.sampled_from(["", ".1", ".12345", ".1234567", ".000000"]),
)
odd_stamps = st.one_of(
    canonical_stamps.map(lambda t: t.replace("T", " ")),
    canonical_stamps.map(lambda t: t[:-1]),
    canonical_stamps.map(lambda t: t.replace("Z", "+00:00")),
    canonical_stamps.map(lambda t: t.replace("1", "\u0661")),  # an Arabic-Indic digit
    canonical_stamps.map(lambda t: "0" + t[1:]),
    st.text(alphabet=string.digits + "-T:.Z ", max_size=30),
    st.integers(),
    st.none(),
)
created_at = st.one_of(
    canonical_stamps, canonical_stamps, canonical_stamps, near_stamps, odd_stamps
)
extra_keys = st.dictionaries(
    st.sampled_from(
        ["is_label", "alt_text", "tags", "mime_type", "file_size", "width", "height", "vendor"]
    ),
    st.one_of(st.booleans(), st.text(JSONB_TEXT, max_size=5), st.integers(-5, 5), st.just(["a"])),
    max_size=2,
)


@st.composite
def images(draw: st.DrawFn) -> Any:
    n = draw(st.integers(0, 8))
    out: list[Any] = []
    for pos in range(n):
        element: dict[str, Any] = {
            "url": f"https://cdn.example/{pos}.jpg",
            "order": pos,
            "created_at": draw(created_at),
        }
        if draw(st.integers(0, 9)) == 0:  # one perturbation in ten elements
            kind = draw(st.integers(0, 6))
            if kind == 0:
                element["order"] = draw(st.sampled_from([pos + 1, -1, 0, 1.0 * pos, str(pos)]))
            elif kind == 1:
                del element["order"]
            elif kind == 2:
                del element["created_at"]
            elif kind == 3:
                element.update(draw(extra_keys))
            elif kind == 4:
                element["url"] = draw(st.sampled_from(["", None, 7, "https://cdn.example/0.jpg"]))
            elif kind == 5:
                out.append(draw(st.sampled_from([None, 1, "x", [], {}])))
            else:
                element.pop("url")
        out.append(element)
    return draw(st.sampled_from([out, out, out, out, {"not": "an array"}, "x", None]))


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(images(), min_size=20, max_size=20))
def test_v3_maps_generated_arrays_as_v2_does(v2: Conn, batch: list[Any]) -> None:
    assert differing(v2, batch) == []


def test_boundaries_of_the_short_cut(v2: Conn) -> None:
    """Each check of the legacy shape at its edge, inside and just outside."""

    def legacy(*stamps: Any, **changes: Any) -> list[dict[str, Any]]:
        out = [
            {"url": f"https://cdn.example/{i}.jpg", "order": i, "created_at": s}
            for i, s in enumerate(stamps)
        ]
        out[-1].update(changes)
        return out

    ok = "2025-03-01T12:00:00.000000Z"
    cases = [
        [],
        legacy(ok),
        legacy(ok, ok, ok),
        *(
            legacy(ok, stamp(2025, m, d, 0, 0, 0, ".000000"))
            for m in (1, 2, 4, 6, 9, 11, 12)
            for d in (28, 29, 30, 31, 32)
        ),
        legacy(ok, "2024-02-29T00:00:00.000000Z"),  # a leap day: v4 leaves it to v2's path
        legacy(ok, "2025-02-29T00:00:00.000000Z"),
        legacy(ok, "2025-01-3\u0661T00:00:00.000000Z"),
        legacy(ok, "1000-01-01T00:00:00.000000Z"),
        legacy(ok, "9999-12-28T23:59:59.999999Z"),
        legacy(ok, "0999-12-28T23:59:59.999999Z"),
        legacy(ok, "2025-00-10T00:00:00.000000Z"),
        legacy(ok, "2025-13-10T00:00:00.000000Z"),
        legacy(ok, "2025-01-00T00:00:00.000000Z"),
        legacy(ok, "2025-01-10T24:00:00.000000Z"),
        legacy(ok, "2025-01-10T23:60:00.000000Z"),
        legacy(ok, "2025-01-10T23:59:60.000000Z"),
        legacy(ok, "2025-01-10T23:59:59.00000Z"),
        legacy(ok, "2025-01-10T23:59:59Z"),
        legacy(ok, "2025-01-10t23:59:59.000000Z"),
        legacy(ok, "2025-01-10T23:59:59.000000z"),
        legacy(ok, "2025-01-1\u0660T23:59:59.000000Z"),
        legacy(ok, "\uff12\uff10\uff12\uff15-01-10T23:59:59.000000Z"),  # fullwidth digits
        legacy(ok, 20250110),
        legacy(ok, None),
        *(legacy(ok, order=o) for o in (7, -1, 1.5, "x", None, 10**12, [0])),  # one element
        [{"url": "https://cdn.example/0.jpg", "created_at": ok}],
        # two elements whose orders swap them: the order decides, no short cut
        [{**legacy(ok)[0], "order": 1}, {**legacy(ok, ok)[1], "order": 0}],
        legacy(ok, ok, order=-1),
        legacy(ok, ok, order=1.0),
        legacy(ok, ok, order=2),
        legacy(ok, ok, order="1"),
        legacy(ok, ok, is_label=False),
        legacy(ok, ok, is_label=True),
        legacy(ok, ok, alt_text="a"),
        legacy(ok, ok, url=""),
        [*legacy(ok), None],
        [*legacy(ok), {"url": "https://cdn.example/x.jpg", "order": 1}],
        {"url": "https://cdn.example/x.jpg", "order": 0, "created_at": ok},
    ]
    assert differing(v2, cases) == []
    # Not vacuous: the two are different functions, and the short cut returns rows.
    bodies = v2.execute(
        "SELECT pg_get_functiondef('imgmig.images_to_rows(jsonb)'::regprocedure), "
        "       pg_get_functiondef('mapv2.images_to_rows(jsonb)'::regprocedure)"
    ).fetchone()
    assert bodies is not None
    assert "shape AS" in bodies[0]
    assert "shape AS" not in bodies[1]
    rows = v2.execute(
        'SELECT url, "order", extra FROM imgmig.images_to_rows(%s)', (Jsonb(legacy(ok, ok)),)
    ).fetchall()
    assert rows == [("https://cdn.example/0.jpg", 0, {}), ("https://cdn.example/1.jpg", 1, {})]


def test_seeded_products_map_as_in_v2(v2: Conn) -> None:
    """Every product the seed wrote (the legacy shape and its malformed cases) in all
    tenants maps to v2's rows."""
    tenants = [r[0] for r in v2.execute("SELECT tenant FROM imgmig.tenant_state").fetchall()]
    checked = 0
    for tenant in tenants:
        arrays = v2.execute(
            sql.SQL("SELECT coalesce(jsonb_agg(images), '[]') FROM {}").format(
                sql.Identifier(tenant, "products")
            )
        ).fetchone()
        assert arrays is not None
        batch = arrays[0]
        checked += len(batch)
        assert differing(v2, batch) == [], tenant
    assert checked >= 300  # the test seed: 300 products over four tenants


def test_v4_skips_the_general_pipeline_for_the_legacy_shape(conn: Conn) -> None:
    """v4 calls images_to_rows_general only when the short cut does not apply: the day
    check follows the month (31 January and 30 April in, 31 April and 29 February out)."""

    def general_calls(stamp_text: str, **extra: Any) -> int:
        element = {"url": "https://cdn.example/0.jpg", "order": 0, "created_at": stamp_text}
        count = (
            "SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions "
            "WHERE schemaname = 'imgmig' AND funcname = 'images_to_rows_general'"
        )
        with conn.transaction(force_rollback=True):
            conn.execute("SET LOCAL track_functions = 'pl'")
            # the view holds counts not yet reported, earlier transactions' too: a difference
            before = conn.execute(count).fetchone()
            conn.execute(
                "SELECT count(*) FROM imgmig.images_to_rows(%s)", (Jsonb([{**element, **extra}]),)
            )
            after = conn.execute(count).fetchone()
        assert before is not None
        assert after is not None
        return int(after[0]) - int(before[0])

    assert general_calls("2025-01-31T10:00:00.000000Z") == 0
    assert general_calls("2025-04-30T10:00:00.000000Z") == 0
    assert general_calls("2025-04-31T10:00:00.000000Z") == 1
    assert general_calls("2024-02-29T10:00:00.000000Z") == 1
    assert general_calls("2025-01-31T10:00:00.000000Z", alt_text="a") == 1
    # the capture trigger's append maps the new element alone, with its order in the array
    assert general_calls("2025-01-31T10:00:00.000000Z", order=6) == 0


def test_v4_down_puts_v3_back(v2: Conn, migrated_url: str) -> None:
    """Below 0008_mapping_v4 (every tenant) the mapping is v3's again, without the
    general function; upgrading installs v4 once more."""

    conn = v2

    def general_exists() -> bool:
        row = conn.execute(
            "SELECT to_regprocedure('imgmig.images_to_rows_general(jsonb)') IS NOT NULL"
        ).fetchone()
        return row is not None and bool(row[0])

    assert general_exists()
    migrate.downgrade(migrated_url, "0007_inline_v5", tenants=[TENANT])
    assert general_exists()  # other tenants are still at v4
    migrate.downgrade(migrated_url, "0007_inline_v5")
    assert not general_exists()
    body = conn.execute(
        "SELECT pg_get_functiondef('imgmig.images_to_rows(jsonb)'::regprocedure)"
    ).fetchone()
    assert body is not None
    assert "shape AS" in body[0]
    assert "images_to_rows_general" not in body[0]
    day_31 = {
        "url": "https://cdn.example/0.jpg",
        "order": 0,
        "created_at": "2025-01-31T10:00:00.000000Z",
    }
    assert differing(conn, [[day_31], [{**day_31, "alt_text": "a"}]]) == []
    migrate.upgrade(migrated_url)
    assert general_exists()


def test_last_tenant_down_puts_v2_back(conn: Conn, migrated_url: str) -> None:
    """Downgrading one tenant keeps v3 for the others; the last one restores v2."""

    def has_v3() -> bool:
        row = conn.execute(
            "SELECT pg_get_functiondef('imgmig.images_to_rows(jsonb)'::regprocedure)"
        ).fetchone()
        return row is not None and "shape AS" in row[0]

    assert has_v3()
    migrate.downgrade(migrated_url, "0004_capture_v3", tenants=[TENANT])
    assert has_v3()
    migrate.downgrade(migrated_url, "0004_capture_v3")
    assert not has_v3()
    migrate.upgrade(migrated_url)
    assert has_v3()
