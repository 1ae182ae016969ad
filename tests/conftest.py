"""One real PostgreSQL per test session; a fresh database per test.

The server comes from ``cdc.server.provide``: DATABASE_URL, else testcontainers when a
Docker engine answers, else the embedded PostgreSQL 18 wheel in a short temp dir that is
stopped and deleted at exit. Fixtures hand each test its own database, cloned from a
template built once per session, so tests never share state and never clean up with DELETE.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

from cdc import migrate, server
from cdc.seed import SeedConfig, seed

# A small StoFlow-like data set: same shape as production, fast to clone.
SMALL = SeedConfig(products=300, labels=60, mess_share=0.05, seed=7)


def _admin(url: str) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(server.with_database(url, "postgres"), autocommit=True)


def _create_db(base_url: str, name: str, template: str | None = None) -> str:
    with _admin(base_url) as conn:
        stmt = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template:
            stmt = sql.SQL("{} TEMPLATE {}").format(stmt, sql.Identifier(template))
        conn.execute(stmt)
    return server.with_database(base_url, name)


def _drop_db(base_url: str, name: str) -> None:
    with _admin(base_url) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _unique(prefix: str) -> str:
    return f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def pg() -> Iterator[server.Server]:
    """The session's PostgreSQL server."""
    with server.provide() as srv:
        yield srv


@pytest.fixture(scope="session")
def seeded_template(pg: server.Server) -> Iterator[str]:
    """Name of a template database holding the SMALL seed, not migrated."""
    name = _unique("tpl_seeded")
    url = _create_db(pg.url, name)
    with psycopg.connect(url) as conn:
        seed(conn, SMALL)
    yield name
    _drop_db(pg.url, name)


@pytest.fixture(scope="session")
def migrated_template(pg: server.Server, seeded_template: str) -> Iterator[str]:
    """Name of a template database holding the SMALL seed, upgraded to `expand`."""
    name = _unique("tpl_migrated")
    url = _create_db(pg.url, name, template=seeded_template)
    migrate.upgrade(url)
    yield name
    _drop_db(pg.url, name)


def _fresh(pg: server.Server, prefix: str, template: str | None) -> Iterator[str]:
    name = _unique(prefix)
    url = _create_db(pg.url, name, template=template)
    yield url
    _drop_db(pg.url, name)


@pytest.fixture
def database_url(pg: server.Server) -> Iterator[str]:
    """A fresh, empty database for this test."""
    yield from _fresh(pg, "t_empty", None)


@pytest.fixture
def seeded_url(pg: server.Server, seeded_template: str) -> Iterator[str]:
    """A fresh database with the SMALL seed, before any migration."""
    yield from _fresh(pg, "t_seeded", seeded_template)


@pytest.fixture
def migrated_url(pg: server.Server, migrated_template: str) -> Iterator[str]:
    """A fresh database with the SMALL seed, upgraded to `expand` (stage jsonb)."""
    yield from _fresh(pg, "t_migrated", migrated_template)


@pytest.fixture
def conn(migrated_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """An autocommit connection to a migrated database."""
    with psycopg.connect(migrated_url, autocommit=True) as c:
        yield c


@pytest.fixture
def pg_urls(pg: server.Server) -> Iterator[tuple[str, str, str]]:
    """Three fresh, empty databases."""
    names = [_unique("t_multi") for _ in range(3)]
    urls = tuple(_create_db(pg.url, n) for n in names)
    yield urls  # type: ignore[misc]
    for n in names:
        _drop_db(pg.url, n)
