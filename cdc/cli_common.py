"""What every CLI verb shares: the resolved database URL, the console, shared options."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from pydantic import ByteSize, TypeAdapter, ValidationError
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


def byte_size(value: str) -> int:
    """A size such as ``256MiB``, ``1GB`` or ``0`` (PostgreSQL's kB/MB/GB are read as powers
    of 1,000; write KiB/MiB/GiB for powers of 1,024)."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(value))
    except ValidationError as exc:
        raise typer.BadParameter(f"{value!r} is not a size such as 256MiB, 1GB or 0") from exc


# The backfill's wait for lagging WAL consumers (cdc.replicas), on `backfill` and `deploy run`.
MaxReplicaLagOpt = Annotated[
    int,
    typer.Option(
        parser=byte_size,
        metavar="SIZE",
        show_default="256MiB",
        help="Wait between backfill batches while a standby or logical consumer is this far "
        "behind in WAL (0: never wait).",
    ),
]
ReplicaLagIgnoreOpt = Annotated[
    Optional[list[str]],  # noqa: UP045 - Typer needs Optional here
    typer.Option(
        metavar="NAME",
        help="A consumer's application_name not to wait for, e.g. a delayed standby (repeatable).",
    ),
]
