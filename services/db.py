"""Engines and tenant-bound sessions. Nothing connects at import time."""

from __future__ import annotations

from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from cdc.server import sqlalchemy_url
from cdc.tenants import validate_name


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """A SQLAlchemy engine on psycopg 3 for a libpq URL."""
    return create_engine(sqlalchemy_url(url), pool_size=pool_size, pool_pre_ping=True)


def tenant_session(engine: Engine, tenant: str) -> Session:
    """A Session whose unqualified tables resolve to ``tenant``'s schema."""
    bound = engine.execution_options(schema_translate_map={None: validate_name(tenant)})
    return Session(bound)
