"""Tenant schemas: discovered from the catalog, validated against one pattern.

A tenant is a schema named ``user_<n>`` or ``template_tenant`` that holds a ``products``
table. Names only ever come from the catalog or from this validation; they reach SQL as
``psycopg.sql.Identifier``, never pasted into a string.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from cdc.db import Conn
from cdc.errors import InvalidTenantNameError, UnknownTenantError

TENANT_PATTERN = re.compile(r"^(user_[0-9]+|template_tenant)$")
CONTROL_SCHEMA = "imgmig"
TRUTH_SCHEMA = "seed_truth"

_DISCOVER = """
    SELECT n.nspname
      FROM pg_namespace n
      JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = 'products' AND c.relkind = 'r'
     WHERE n.nspname ~ '^(user_[0-9]+|template_tenant)$'
"""


def sort_key(name: str) -> tuple[int, int, str]:
    """user_2 before user_10; template_tenant last."""
    if name.startswith("user_"):
        return (0, int(name[5:]), name)
    return (1, 0, name)


def validate_name(name: str) -> str:
    """Return ``name`` if it is a well-formed tenant name, else raise."""
    if not TENANT_PATTERN.match(name):
        raise InvalidTenantNameError(tenant=name)
    return name


def discover(conn: Conn) -> list[str]:
    """Every tenant schema in the database, in natural order."""
    rows = conn.execute(_DISCOVER).fetchall()
    return sorted((str(r[0]) for r in rows), key=sort_key)


def resolve(
    conn: Conn,
    wanted: Iterable[str] | None = None,
) -> list[str]:
    """The tenants to act on: all of them, or the ``wanted`` ones, which must exist."""
    known = discover(conn)
    if wanted is None:
        return known
    chosen = []
    for name in wanted:
        validate_name(name)
        if name not in known:
            raise UnknownTenantError(tenant=name, known=tuple(known))
        chosen.append(name)
    return chosen
