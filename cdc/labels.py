"""Label strategies applied at backfill time: which image, if any, is the price-tag label.

Evidence, strongest first (DESIGN.md, "Labels"):

1. ``explicit``: an element that states ``is_label`` decides for its whole product, with
   confidence 1.0. The canonical projection (``imgmig.project``) already applies it and
   stores ``label_strategy = 'explicit'``, so it needs no statement here and always wins.
2. ``legacy-image-type`` (``cdc.label_evidence``): the legacy ``image_type`` imported into
   ``imgmig.label_evidence`` (``imgmig labels import-legacy``); confidence 0.99. It also
   decides "no label" for products whose every image is a legacy photo.
3. ``metadata`` (``cdc.label_heuristics``): naive Bayes over position, created_at gap and
   extension/mime/dimensions, each decision with its own calibrated confidence (at most
   0.98); uncertain or self-contradicting decisions go to the review queue
   (``cdc.label_review``).
4. ``last-image``: the seed's rule, the last image by order. Off by default: production
   has 611 real labels among 3,282 products, so its precision is about 0.19, which is
   the confidence it records.

:data:`RECOMMENDED` is ``explicit, legacy-image-type, metadata``: on the default seed it
measures precision and recall of 1.0 where last-image has 0.19 and 1.0
(``docs/labels.md``). Without imported evidence ``legacy-image-type`` decides nothing
and ``metadata`` runs on its default likelihood ratios. :data:`DEFAULT` (the backfill's
default) stays ``explicit`` for now: several backfill/reconcile tests assert that a
default backfill is an exact projection of the JSONB, and a heuristic label is
table-only knowledge. Callers that want detection pass :data:`RECOMMENDED` (deploy and
``imgmig labels apply`` do); flipping DEFAULT is one line once those tests say which
strategies they mean.

A strategy only decides products where no element states ``is_label`` and no row is a
label or carries a strategy yet (a "no label" decision leaves its strategy on the rows);
the first enabled strategy that decides a product wins. Strategies with an
``apply_batch`` method (:class:`BatchStrategy`) run their own statement; the others are
applied through ``pick_sql``. Rows nobody decided keep NULL (not a label, no evidence).
Product code never reads the ``seed_truth`` schema.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, LiteralString, Protocol, runtime_checkable

from psycopg import sql

from cdc.db import Conn
from cdc.errors import UnknownLabelStrategyError
from cdc.label_evidence import LegacyImageType
from cdc.label_heuristics import MetadataHeuristic

EXPLICIT: Final = "explicit"


class LabelStrategy(Protocol):
    """Picks at most one label image per undecided product.

    ``pick_sql`` is a query over ``{images}`` (the tenant's ``product_images``) and the
    CTE ``undecided(product_id)``, returning one ``image_id`` per product it decides.
    """

    @property
    def name(self) -> str: ...

    @property
    def confidence(self) -> float: ...

    def pick_sql(self) -> LiteralString: ...


@runtime_checkable
class BatchStrategy(Protocol):
    """A strategy that needs more than one pick: per-row confidence, "no label", queueing."""

    def apply_batch(self, conn: Conn, tenant: str, ids: Sequence[int]) -> int: ...


@dataclass(frozen=True)
class LastImage:
    """The seed's rule: the image with the highest order (ties: the newest row)."""

    name: str = "last-image"
    confidence: float = 0.19

    def pick_sql(self) -> LiteralString:
        return """
            SELECT DISTINCT ON (r.product_id) r.id AS image_id
              FROM {images} r JOIN undecided u ON u.product_id = r.product_id
             ORDER BY r.product_id, r."order" DESC, r.id DESC
        """


REGISTRY: Final[dict[str, LabelStrategy]] = {
    s.name: s for s in (LegacyImageType(), MetadataHeuristic(), LastImage())
}
DEFAULT: Final = (EXPLICIT,)
RECOMMENDED: Final = (EXPLICIT, "legacy-image-type", "metadata")


def known() -> tuple[str, ...]:
    return (EXPLICIT, *REGISTRY)


def resolve(names: Iterable[str]) -> tuple[LabelStrategy, ...]:
    """The heuristic strategies named, in order; ``explicit`` is implied and always first."""
    chosen: list[LabelStrategy] = []
    for name in names:
        if name == EXPLICIT:
            continue
        if name not in REGISTRY:
            raise UnknownLabelStrategyError(name=name, known=known())
        chosen.append(REGISTRY[name])
    return tuple(chosen)


# Products of the batch with no explicit evidence (no element states is_label, read
# through the canonical mapping) and no decision yet (cdc.label_store.UNDECIDED).
_APPLY: LiteralString = """
WITH undecided AS (
    SELECT p.id AS product_id
      FROM {products} p
     WHERE p.id = ANY (%(ids)s)
       AND NOT EXISTS (SELECT 1 FROM imgmig.images_to_rows(p.images) m
                        WHERE m.is_label IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM {images} r WHERE r.product_id = p.id
                                          AND (r.is_label OR r.label_strategy IS NOT NULL))
), pick AS ({pick})
UPDATE {images} r
   SET is_label = true, label_strategy = %(name)s, label_confidence = %(confidence)s,
       updated_at = now()
  FROM pick
 WHERE r.id = pick.image_id
"""


def apply_statement(tenant: str, strategy: LabelStrategy) -> sql.Composed:
    """The one set-based statement that applies ``strategy`` to a batch of products."""
    images = sql.Identifier(tenant, "product_images")
    pick = sql.SQL(strategy.pick_sql()).format(images=images)
    return sql.SQL(_APPLY).format(
        products=sql.Identifier(tenant, "products"), images=images, pick=pick
    )


def apply(conn: Conn, tenant: str, ids: Sequence[int], strategies: Sequence[LabelStrategy]) -> int:
    """Apply the heuristic strategies, in order, to products ``ids``; rows labelled."""
    labelled = 0
    for strategy in strategies:
        if isinstance(strategy, BatchStrategy):
            labelled += strategy.apply_batch(conn, tenant, ids)
            continue
        cur = conn.execute(
            apply_statement(tenant, strategy),
            {"ids": list(ids), "name": strategy.name, "confidence": strategy.confidence},
        )
        labelled += max(cur.rowcount, 0)
    return labelled


def apply_tenant(
    conn: Conn, tenant: str, strategies: Sequence[LabelStrategy], *, batch_size: int = 500
) -> int:
    """Apply the strategies to every product of an already backfilled tenant; labels set.

    Only undecided products change, so it is safe to rerun, e.g. after importing
    evidence. One transaction per batch of ``batch_size`` products, in id order.
    """
    query = sql.SQL("SELECT id FROM {} WHERE id > %s ORDER BY id LIMIT %s").format(
        sql.Identifier(tenant, "products")
    )
    labelled, after = 0, 0
    while True:
        ids = [int(r[0]) for r in conn.execute(query, (after, batch_size)).fetchall()]
        if not ids:
            return labelled
        with conn.transaction():
            labelled += apply(conn, tenant, ids, strategies)
        after = ids[-1]
