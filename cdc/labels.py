"""Label strategies applied at backfill time: which image, if any, is the price-tag label.

Evidence, strongest first (DESIGN.md, "Labels"):

1. ``explicit``: an element that states ``is_label`` decides for its whole product, with
   confidence 1.0. The canonical projection (``imgmig.project``) already applies it and
   stores ``label_strategy = 'explicit'``, so it needs no statement here and always wins.
2. importable evidence (the legacy ``image_type``) and 3. metadata heuristics: later
   strategies; they plug in as :class:`LabelStrategy` objects.
4. ``last-image``: the seed's rule, the last image by order. Off by default: production
   has 611 real labels among 3,282 products, so its precision is about 0.19, which is
   the confidence it records.

A heuristic strategy only decides products where no element states ``is_label`` and no
row is a label yet; the first enabled strategy that picks an image wins. Rows it labels
get ``label_strategy`` and ``label_confidence``; rows nobody decided keep NULL (not a
label, no evidence). Product code never reads the ``seed_truth`` schema.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, LiteralString, Protocol

from psycopg import sql

from cdc.db import Conn
from cdc.errors import UnknownLabelStrategyError

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


REGISTRY: Final[dict[str, LabelStrategy]] = {s.name: s for s in (LastImage(),)}
DEFAULT: Final = (EXPLICIT,)


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
# through the canonical mapping) and no label row yet.
_APPLY: LiteralString = """
WITH undecided AS (
    SELECT p.id AS product_id
      FROM {products} p
     WHERE p.id = ANY (%(ids)s)
       AND NOT EXISTS (SELECT 1 FROM imgmig.images_to_rows(p.images) m
                        WHERE m.is_label IS NOT NULL)
       AND NOT EXISTS (SELECT 1 FROM {images} r WHERE r.product_id = p.id AND r.is_label)
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
        cur = conn.execute(
            apply_statement(tenant, strategy),
            {"ids": list(ids), "name": strategy.name, "confidence": strategy.confidence},
        )
        labelled += max(cur.rowcount, 0)
    return labelled
