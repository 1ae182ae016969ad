"""Metadata heuristics: is a product's last image its price-tag label?

The candidate is the product's last image by order that the imported evidence does not
call a photo. Three features of it, each cut into bins:

* ``ext``: ``png`` / ``jpg`` / ``other``, from ``mime_type`` when present, else the url's
  extension. Labels are mostly screenshots or exports (png); photos are camera jpgs.
* ``gap``: time since the newest image created before it: ``session`` (< 15 min, same
  upload session), ``short`` (< 1 h), ``later`` (1-24 h: the label is shot at the end
  of the day), ``days`` (a later upload: a new photo), ``unknown`` (no ``created_at`` in
  the element). Measuring against older images only keeps the signal when new photos
  are inserted before a label.
* ``dim``: ``same`` / ``differs`` from that previous image's width x height, ``unknown``.

The decision is naive Bayes: posterior odds = prior odds x the likelihood ratio (LR) of
each feature's bin; p = odds / (1 + odds). p >= 0.5 labels the candidate with confidence
p, else the product is decided "no label" with confidence 1 - p; both are capped at
:data:`MAX_CONFIDENCE`, below imported evidence. The LRs come from
``imgmig.label_calibration`` when :func:`calibrate` has measured them on the products
that have legacy evidence, else from :data:`DEFAULT_LR` (production's prior, and the
label/photo shares of each bin that the team observed).

A decision goes to the review queue when its confidence is below the threshold, or when
two strong signals (LR >= :data:`STRONG` or <= 1/STRONG) point opposite ways.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, LiteralString

from psycopg import sql
from psycopg.types.json import Jsonb

from cdc import label_evidence, label_store
from cdc.db import Conn
from cdc.tenants import discover

NAME: Final = "metadata"
MAX_CONFIDENCE: Final = 0.98
REVIEW_BELOW: Final = 0.9
STRONG: Final = 10.0
BINS: Final[dict[str, tuple[str, ...]]] = {
    "ext": ("png", "jpg", "other"),
    "gap": ("session", "short", "later", "days", "unknown"),
    "dim": ("same", "differs", "unknown"),
}
# Production: 611 labels among 3,282 products. Bins: ~80% of labels and ~6% of photos
# are png; a label comes hours after its photos, a photo minutes after the previous one.
DEFAULT_LR: Final[dict[str, float]] = {
    "prior:odds": 611 / (3282 - 611),
    "ext:png": 0.80 / 0.06,
    "ext:jpg": 0.20 / 0.94,
    "ext:other": 1.0,
    "gap:session": 0.05,
    "gap:short": 1.0,
    "gap:later": 50.0,
    "gap:days": 0.5,
    "gap:unknown": 1.0,
    "dim:same": 0.5,
    "dim:differs": 2.0,
    "dim:unknown": 1.0,
}
MIN_SAMPLE: Final = 20
MIN_BIN: Final = 5

# Candidates and their feature bins, per product of `undecided`: the last image by order
# that is not a known photo and, when {current_label} is a condition on r, the image that
# is the label now (a refresh keeps a label a photo was appended after). {images} has
# (id, product_id, url, "order", created_at, mime_type, width, height, extra);
# {known_photo} is a condition on r; {in_batch} repeats the batch's ids as a condition on
# r, so the planner reaches the rows through the product_id index instead of a hash join
# over the whole table (a backfill batch would otherwise scan every row written so far).
# {prev_rows} is where a candidate's earlier image is looked up, a FROM item aliased o
# with the columns of {images}: {images} itself when it is a table (its product_id index
# finds the product's rows), the product's own rows when {images} is a CTE (a CTE has no
# index, so each candidate would scan the whole sample: quadratic in the tenant's size).
# A row whose element had no created_at holds the projection time, marked in
# extra."$absent": it says nothing about the gap.
_FEATURES: LiteralString = """
cand_rows AS (
    (SELECT DISTINCT ON (r.product_id) r.product_id, r.id, r.url, r.mime_type, r.width,
            r.height, r.created_at, r.extra
       FROM {images} r JOIN undecided u ON u.product_id = r.product_id
      WHERE ({in_batch}) AND NOT ({known_photo})
      ORDER BY r.product_id, r."order" DESC, r.id DESC)
    UNION
    SELECT r.product_id, r.id, r.url, r.mime_type, r.width, r.height, r.created_at, r.extra
      FROM {images} r JOIN undecided u ON u.product_id = r.product_id
     WHERE ({in_batch}) AND ({current_label}) AND NOT ({known_photo})
), cand AS (
    SELECT r.product_id, r.id, r.url, r.mime_type, r.width, r.height,
           CASE WHEN NOT coalesce(r.extra -> '$absent' ? 'created_at', false)
                THEN r.created_at END AS created_at,
           lower(substring(r.url FROM '\\.([A-Za-z0-9]+)(?:[?#].*)?$')) AS ext
      FROM cand_rows r
), feat AS (
    SELECT c.product_id, c.id, c.url,
           CASE WHEN c.mime_type ILIKE 'image/png' THEN 'png'
                WHEN c.mime_type ILIKE 'image/jp%%' THEN 'jpg'
                WHEN c.mime_type IS NOT NULL THEN 'other'
                WHEN c.ext = 'png' THEN 'png'
                WHEN c.ext IN ('jpg', 'jpeg') THEN 'jpg'
                ELSE 'other' END AS ext_bin,
           CASE WHEN prev.gap IS NULL THEN 'unknown'
                WHEN prev.gap < interval '15 minutes' THEN 'session'
                WHEN prev.gap < interval '1 hour' THEN 'short'
                WHEN prev.gap <= interval '24 hours' THEN 'later'
                ELSE 'days' END AS gap_bin,
           CASE WHEN c.width IS NULL OR c.height IS NULL
                  OR prev.width IS NULL OR prev.height IS NULL THEN 'unknown'
                WHEN (c.width, c.height) = (prev.width, prev.height) THEN 'same'
                ELSE 'differs' END AS dim_bin
      FROM cand c
      LEFT JOIN LATERAL (
          SELECT c.created_at - o.created_at AS gap, o.width, o.height
            FROM {prev_rows}
           WHERE o.product_id = c.product_id AND o.id <> c.id
             AND o.created_at <= c.created_at
             AND NOT coalesce(o.extra -> '$absent' ? 'created_at', false)
           ORDER BY o.created_at DESC, o.id DESC
           LIMIT 1) prev ON true
)"""

_KNOWN_PHOTO: LiteralString = """EXISTS (
    SELECT 1 FROM imgmig.label_evidence e
     WHERE e.tenant = %(tenant)s AND e.product_id = r.product_id AND e.url = r.url
       AND e.image_type = 'photo')"""

# Scores and decides the products of `undecided` (a query over the batch's ids): ends
# with the CTE `decided`, one row per product (the best candidate, its proposal, conf).
_DECIDE: LiteralString = """
WITH undecided AS ({undecided}),
{features},
lr AS (
    SELECT f.*,
           ln(coalesce((%(lr)s::jsonb ->> ('ext:' || f.ext_bin))::float8, 1)) AS l_ext,
           ln(coalesce((%(lr)s::jsonb ->> ('gap:' || f.gap_bin))::float8, 1)) AS l_gap,
           ln(coalesce((%(lr)s::jsonb ->> ('dim:' || f.dim_bin))::float8, 1)) AS l_dim
      FROM feat f
), scored AS (
    SELECT lr.*,
           1 / (1 + exp(-(ln((%(lr)s::jsonb ->> 'prior:odds')::float8)
                          + l_ext + l_gap + l_dim))) AS p,
           greatest(l_ext, l_gap, l_dim) >= ln(%(strong)s)
             AND least(l_ext, l_gap, l_dim) <= -ln(%(strong)s) AS disagree
      FROM lr
), best AS (
    SELECT DISTINCT ON (s.product_id) s.* FROM scored s ORDER BY s.product_id, s.p DESC, s.id DESC
), decided AS (
    SELECT s.*, s.p >= 0.5 AS proposed,
           least(%(cap)s, greatest(s.p, 1 - s.p))::real AS conf,
           (SELECT r.id FROM {images} r WHERE r.product_id = s.product_id AND r.is_label)
             IS DISTINCT FROM CASE WHEN s.p >= 0.5 THEN s.id END AS moved
      FROM best s
)"""

# A row of a decided product whose stored decision differs from the new one.
_DIFFERS: LiteralString = """(r.is_label, r.label_strategy, r.label_confidence)
           IS DISTINCT FROM (d.proposed AND r.id = d.id, %(name)s, d.conf)"""

_APPLY: LiteralString = (
    _DECIDE
    + """, upd AS (
    UPDATE {images} r
       SET is_label = d.proposed AND r.id = d.id,
           label_strategy = %(name)s, label_confidence = d.conf, updated_at = now()
      FROM decided d
     WHERE r.product_id = d.product_id AND r.product_id = ANY (%(ids)s::bigint[])
       AND """
    + _DIFFERS
    + """
    RETURNING r.is_label
), queued AS (
    INSERT INTO imgmig.label_review (tenant, product_id, image_id, url, strategy, confidence,
                                     proposed, reason)
    SELECT %(tenant)s, d.product_id, d.id, d.url, %(name)s, d.conf, d.proposed,
           CASE WHEN d.disagree THEN 'signals disagree' ELSE 'low confidence' END
             || ' (ext=' || d.ext_bin || ', gap=' || d.gap_bin || ', dim=' || d.dim_bin || ')'
      FROM decided d
     WHERE d.conf < %(review_below)s OR d.disagree
    ON CONFLICT (tenant, product_id) WHERE decided_at IS NULL DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM upd WHERE is_label), (SELECT count(*) FROM queued),
       (SELECT count(*) FROM decided WHERE moved)
"""
)

# Read-only: the products whose stored decision would change (a refresh locks only these).
_STALE: LiteralString = (
    _DECIDE
    + """
SELECT DISTINCT d.product_id
  FROM decided d JOIN {images} r ON r.product_id = d.product_id
 WHERE r.product_id = ANY (%(ids)s::bigint[]) AND """
    + _DIFFERS
    + """
 ORDER BY d.product_id
"""
)


# Products of the batch whose decision is this heuristic's alone: every row carries its
# name or none (a row added since). Explicit flags, evidence and review decisions are
# final; a metadata decision is a function of the images and is re-derived when they
# change. Reads only the table, so it works after the contract too.
_DECIDED_BY_ME: LiteralString = """
    SELECT r.product_id
      FROM {images} r
     WHERE r.product_id = ANY (%(ids)s)
     GROUP BY r.product_id
    HAVING bool_and(r.label_strategy IS NULL OR r.label_strategy = %(name)s)
       AND bool_or(r.label_strategy = %(name)s)
"""


def _statement(
    tenant: str, decide: LiteralString, current_label: LiteralString, template: LiteralString
) -> sql.Composed:
    images = sql.Identifier(tenant, "product_images")
    products = sql.Identifier(tenant, "products")
    features = sql.SQL(_FEATURES).format(
        images=images,
        prev_rows=sql.SQL("{} o").format(images),
        known_photo=sql.SQL(_KNOWN_PHOTO),
        current_label=sql.SQL(current_label),
        in_batch=sql.SQL("r.product_id = ANY (%(ids)s::bigint[])"),
    )
    return sql.SQL(template).format(
        undecided=sql.SQL(decide).format(products=products, images=images),
        features=features,
        images=images,
    )


def apply_statement(tenant: str) -> sql.Composed:
    """The one statement that scores, decides and queues a batch (golden-tested)."""
    return _statement(tenant, label_store.UNDECIDED, "false", _APPLY)


def refresh_statement(tenant: str) -> sql.Composed:
    """The same decision again for products this heuristic decided; only changes written."""
    return _statement(tenant, _DECIDED_BY_ME, "r.is_label", _APPLY)


def stale_statement(tenant: str) -> sql.Composed:
    """Read-only: which of the products this heuristic decided would now decide otherwise."""
    return _statement(tenant, _DECIDED_BY_ME, "r.is_label", _STALE)


def load_lr(conn: Conn) -> dict[str, float]:
    """The calibrated likelihood ratios over the defaults (defaults where not measured)."""
    rows = conn.execute("SELECT feature, bin, lr FROM imgmig.label_calibration").fetchall()
    return {**DEFAULT_LR, **{f"{f}:{b}": float(v) for f, b, v in rows}}


@dataclass(frozen=True)
class MetadataHeuristic:
    """Naive Bayes over position, created_at gap, extension/mime and dimensions."""

    name: str = NAME
    # The confidence of a typical decision; each row stores its own calibrated one.
    confidence: float = MAX_CONFIDENCE
    review_below: float = REVIEW_BELOW
    lr: Mapping[str, float] | None = field(default=None, compare=False)

    def pick_sql(self) -> LiteralString:
        return "SELECT NULL::bigint AS image_id WHERE false"

    def apply_batch(self, conn: Conn, tenant: str, ids: Sequence[int]) -> int:
        """Decide every undecided product of ``ids``; labels set (queued ones included)."""
        rows = self._run(conn, apply_statement(tenant), self._params(conn, tenant, ids))
        return int(rows[0][0]) if rows else 0

    def refresh(self, conn: Conn, tenant: str, ids: Sequence[int]) -> int:
        """Decide products ``ids`` again if this heuristic decided them; returns how many
        products' label moved (gained, lost or changed image).

        The decision was made on the images as they were; an image appended after the
        label, then moved before it, would otherwise leave a "no label" decision behind
        and the label published. The label in place stays a candidate, so appending a
        photo after it does not unmake it. Rows are written only where the decision
        changed, so a refresh of unchanged products writes nothing.
        """
        rows = self._run(conn, refresh_statement(tenant), self._params(conn, tenant, ids))
        return int(rows[0][2]) if rows else 0

    def stale(self, conn: Conn, tenant: str, ids: Sequence[int]) -> list[int]:
        """Of products ``ids``, those whose stored decision a refresh would change (reads
        only, takes no lock)."""
        rows = self._run(conn, stale_statement(tenant), self._params(conn, tenant, ids))
        return [int(r[0]) for r in rows]

    @staticmethod
    def _run(
        conn: Conn, statement: sql.Composed, params: dict[str, object]
    ) -> list[tuple[Any, ...]]:
        """Run the statement with JIT off for it alone (caller's transaction). Right after
        a backfill ``product_images`` has no statistics yet, the planner then takes every
        ``product_id = ANY (…)`` for the whole table and JIT-compiles: 1.1 s for a batch
        that runs in 43 ms (BENCHMARKS.md). The setting is put back afterwards."""
        row = conn.execute("SELECT current_setting('jit'), set_config('jit', 'off', true)")
        previous = row.fetchone()
        found = conn.execute(statement, params).fetchall()
        if previous is not None:
            conn.execute("SELECT set_config('jit', %s, true)", (previous[0],))
        return found

    def _params(self, conn: Conn, tenant: str, ids: Sequence[int]) -> dict[str, object]:
        label_store.ensure(conn)
        return {
            "ids": list(ids),
            "tenant": tenant,
            "name": self.name,
            "lr": Jsonb(dict(self.lr) if self.lr is not None else load_lr(conn)),
            "strong": STRONG,
            "cap": MAX_CONFIDENCE,
            "review_below": self.review_below,
        }


# Calibration sample: every product with evidence, its rows read from the JSONB through
# the canonical mapping (the table may not be backfilled yet). A candidate is a label
# when the evidence calls its url a label, a photo when it calls it a photo.
# The rows of the products ``p`` that {which} selects, with ids unique in the sample.
_SAMPLE_ROWS: LiteralString = """
    SELECT (p.id * 1000 + m."order")::bigint AS id, p.id AS product_id, m.url, m."order",
           m.created_at, m.mime_type, m.width, m.height, m.extra
      FROM {products} p CROSS JOIN LATERAL imgmig.images_to_rows(p.images) m
     WHERE {which}"""

_SAMPLE: LiteralString = """
WITH undecided AS (
    SELECT DISTINCT e.product_id FROM imgmig.label_evidence e WHERE e.tenant = %(tenant)s
), sample_rows AS ({sample_rows}
),
{features}
SELECT e.image_type, f.ext_bin, f.gap_bin, f.dim_bin
  FROM feat f
  JOIN imgmig.label_evidence e
    ON e.tenant = %(tenant)s AND e.product_id = f.product_id AND e.url = f.url
"""


def sample_statement(tenant: str) -> sql.Composed:
    products = sql.Identifier(tenant, "products")

    def rows(which: str) -> sql.Composed:
        return sql.SQL(_SAMPLE_ROWS).format(products=products, which=sql.SQL(which))

    features = sql.SQL(_FEATURES).format(
        images=sql.Identifier("sample_rows"),
        prev_rows=sql.SQL("({}) o").format(rows("p.id = c.product_id")),
        known_photo=sql.SQL("false"),
        current_label=sql.SQL("false"),
        in_batch=sql.SQL("true"),
    )
    return sql.SQL(_SAMPLE).format(
        sample_rows=rows("p.id IN (SELECT u.product_id FROM undecided u)"), features=features
    )


# One calibration sample: (image_type, ext bin, gap bin, dim bin).
Sample = Sequence[tuple[str, str, str, str]]


def likelihood_ratios(sample: Sample) -> dict[str, tuple[int, int, float]]:
    """Per ``feature:bin``: (labels, photos, Laplace-smoothed LR); ``prior:odds`` too.

    Bins seen fewer than :data:`MIN_BIN` times are left out, so they keep their default.
    """
    labels = [s for s in sample if s[0] == "label"]
    photos = [s for s in sample if s[0] == "photo"]
    out: dict[str, tuple[int, int, float]] = {
        "prior:odds": (len(labels), len(photos), (len(labels) + 1) / (len(photos) + 1))
    }
    for col, (feature, bins) in enumerate(BINS.items(), start=1):
        for b in bins:
            n_l = sum(1 for s in labels if s[col] == b)
            n_p = sum(1 for s in photos if s[col] == b)
            if n_l + n_p < MIN_BIN:
                continue  # unmeasured: the default stays in force
            share_l = (n_l + 1) / (len(labels) + len(bins))
            share_p = (n_p + 1) / (len(photos) + len(bins))
            out[f"{feature}:{b}"] = (n_l, n_p, share_l / share_p)
    return out


@dataclass(frozen=True)
class Calibration:
    """What :func:`calibrate` measured; ``stored`` is False when the sample was too small."""

    labels: int
    photos: int
    lr: dict[str, float]
    stored: bool
    # Two-fold cross-validation against the evidence: (precision, recall) of "label".
    checked: tuple[float, float] = (1.0, 1.0)


def calibrate(conn: Conn, tenants: Sequence[str] | None = None) -> Calibration:
    """Measure the LRs on the products that have evidence and store them.

    Needs at least :data:`MIN_SAMPLE` labels and photos; otherwise the table is left as
    it was and the defaults (or the last calibration) stay in force.
    """
    label_store.ensure(conn)
    sample: list[tuple[str, str, str, str]] = []
    for tenant in tenants if tenants is not None else discover(conn):
        rows = conn.execute(sample_statement(tenant), {"tenant": tenant}).fetchall()
        sample.extend((str(a), str(b), str(c), str(d)) for a, b, c, d in rows)
    table = likelihood_ratios(sample)
    n_label, n_photo = table["prior:odds"][0], table["prior:odds"][1]
    lr = {**DEFAULT_LR, **{k: v[2] for k, v in table.items()}}
    if min(n_label, n_photo) < MIN_SAMPLE:
        return Calibration(n_label, n_photo, lr, stored=False)
    checked = cross_check(sample)
    with conn.transaction():
        conn.execute("DELETE FROM imgmig.label_calibration")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO imgmig.label_calibration (feature, bin, n_label, n_photo, lr)"
                " VALUES (%s, %s, %s, %s, %s)",
                [(*k.split(":", 1), v[0], v[1], v[2]) for k, v in table.items()],
            )
    return Calibration(n_label, n_photo, lr, stored=True, checked=checked)


def cross_check(sample: Sample) -> tuple[float, float]:
    """Precision and recall of the decision against the evidence, two-fold.

    Steps: 1. fit the LRs on every other sample, 2. decide the rest with them, 3. swap.
    The evidence is the truth here, so this is the production-side quality measure.
    """
    hits = flagged = real = 0
    for fold in (0, 1):
        fit = [s for i, s in enumerate(sample) if i % 2 == fold]
        lr = {**DEFAULT_LR, **{k: v[2] for k, v in likelihood_ratios(fit).items()}}
        for i, (kind, ext, gap, dim) in enumerate(sample):
            if i % 2 == fold:
                continue
            says = posterior(lr, ext, gap, dim) >= 0.5
            flagged += says
            real += kind == "label"
            hits += says and kind == "label"
    return (hits / flagged if flagged else 1.0, hits / real if real else 1.0)


def posterior(lr: Mapping[str, float], ext: str, gap: str, dim: str) -> float:
    """The same arithmetic as the SQL, for tests and the docs."""
    odds = lr["prior:odds"] * lr[f"ext:{ext}"] * lr[f"gap:{gap}"] * lr[f"dim:{dim}"]
    return 1 / (1 + math.exp(-math.log(odds)))


def prepare(conn: Conn) -> Calibration | None:
    """Before a backfill: import the restored backup if it is there, then calibrate.

    Returns the calibration, or ``None`` when there is no backup to import (the
    defaults, or an earlier calibration, stay in force).
    """
    if not label_evidence.legacy_present(conn):
        return None
    label_evidence.import_legacy(conn)
    return calibrate(conn)


_DECIDED_IDS: LiteralString = """
SELECT DISTINCT product_id FROM {images}
 WHERE label_strategy = %(name)s AND product_id > %(after)s
 ORDER BY product_id LIMIT %(limit)s
"""
_LOCK_PRODUCTS: LiteralString = (
    "SELECT id FROM {products} WHERE id = ANY (%(ids)s) ORDER BY id FOR NO KEY UPDATE"
)


def refresh_tenant(
    conn: Conn, tenant: str, *, heuristic: MetadataHeuristic | None = None, batch_size: int = 5000
) -> int:
    """Re-derive every metadata decision of ``tenant``; products whose label moved.

    Per batch of products in id order: 1. a read-only pass finds the products whose
    decision would change (usually none: nothing is locked or written for the rest);
    2. only those are locked ``FOR NO KEY UPDATE``, as the backfill and reconcile lock,
    and decided again under the lock, so a concurrent edit either lands first or waits.
    """
    heuristic = heuristic or MetadataHeuristic()
    images = sql.Identifier(tenant, "product_images")
    query = sql.SQL(_DECIDED_IDS).format(images=images)
    lock = sql.SQL(_LOCK_PRODUCTS).format(products=sql.Identifier(tenant, "products"))
    changed, after = 0, 0
    while True:
        with conn.transaction():
            params = {"name": heuristic.name, "after": after, "limit": batch_size}
            ids = [int(r[0]) for r in conn.execute(query, params).fetchall()]
            stale = heuristic.stale(conn, tenant, ids) if ids else []
        if not ids:
            return changed
        if stale:
            with conn.transaction():
                conn.execute("SELECT set_config('imgmig.source', 'reconcile', true)")
                conn.execute(lock, {"ids": stale})
                changed += heuristic.refresh(conn, tenant, stale)
        after = ids[-1]


_HAS_DECISION: LiteralString = (
    "SELECT EXISTS (SELECT 1 FROM {images} WHERE product_id = %s AND label_strategy = %s)"
)


def _has_decision(conn: Conn, tenant: str, product_id: int, name: str) -> bool:
    query = sql.SQL(_HAS_DECISION).format(images=sql.Identifier(tenant, "product_images"))
    row = conn.execute(query, (product_id, name)).fetchone()
    return bool(row and row[0])


def refresh_product(conn: Conn, tenant: str, product_id: int) -> bool:
    """After an edit of one product (caller's transaction, product locked): re-derive its
    metadata decision if it has one. True when its label moved."""
    heuristic = MetadataHeuristic()
    if not _has_decision(conn, tenant, product_id, heuristic.name):
        return False
    return heuristic.refresh(conn, tenant, [product_id]) > 0


def stale_product(conn: Conn, tenant: str, product_id: int) -> bool:
    """Read-only, no lock: would a refresh change this product's metadata decision?"""
    heuristic = MetadataHeuristic()
    if not _has_decision(conn, tenant, product_id, heuristic.name):
        return False
    return bool(heuristic.stale(conn, tenant, [product_id]))
