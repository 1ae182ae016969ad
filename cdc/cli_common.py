"""What every CLI verb shares: the resolved database URL and the console."""

from __future__ import annotations

from rich.console import Console

from cdc.migrate import DEMO_PGDATA
from cdc.server import start_embedded

out = Console()


class Settings:
    """What the global options said; read by the verbs."""

    database_url: str | None = None


def url() -> str:
    """``--database-url``, else DATABASE_URL, else the demo's persistent embedded server."""
    if Settings.database_url:
        return Settings.database_url
    server, _handle = start_embedded(DEMO_PGDATA)
    return server.url
