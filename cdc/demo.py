"""``imgmig demo``: the main job, on the embedded PostgreSQL by default.

Today it proves the foundation end to end:
1. start (or reuse) the embedded server whose data lives in ``.imgmig/pgdata``;
2. seed the StoFlow-like tenants, unless the same seed is already there;
3. run the expand migration on every tenant (idempotent);
4. print tenants, products, images and stages, and check the totals.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import structlog

from cdc import migrate, seed, status
from cdc.db import connect
from cdc.server import Server, check_reachable, start_embedded, stop_embedded

log = structlog.get_logger(__name__)


@dataclass
class DemoResult:
    server_kind: str
    reused_seed: bool
    summaries: list[status.TenantSummary]
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures


@contextlib.contextmanager
def demo_server(url: str | None) -> Iterator[Server]:
    """The given server, or the demo's persistent embedded one (stopped at the end)."""
    if url:
        check_reachable(url)
        yield Server(url=url, kind="url")
        return
    server, handle = start_embedded(migrate.DEMO_PGDATA)
    try:
        yield server
    finally:
        stop_embedded(handle)


def run(url: str, config: seed.SeedConfig, *, reseed: bool = False) -> DemoResult:
    """Seed (or reuse), upgrade, summarise, and check the totals."""
    with connect(url) as conn:
        reused = not reseed and seed.seeded_with(conn) == asdict(config)
        if reused:
            log.info("reusing seeded data", **asdict(config))
        else:
            seed.seed(conn, config, reset=True, url=url, jobs=2)
    migrate.upgrade(url)
    with connect(url) as conn:
        summaries = status.summarize(conn)
    result = DemoResult(server_kind="", reused_seed=reused, summaries=summaries)
    result.failures = check(summaries, config)
    return result


def check(summaries: list[status.TenantSummary], config: seed.SeedConfig) -> list[str]:
    """What must hold after the foundation steps; empty means all good."""
    failures = []
    total = sum(s.products for s in summaries)
    if total != config.products:
        failures.append(f"expected {config.products} products, found {total}")
    for s in summaries:
        if s.table_images is None:
            failures.append(f"{s.tenant}: product_images missing")
        if s.stage == "not migrated":
            failures.append(f"{s.tenant}: no stage row")
    return failures
