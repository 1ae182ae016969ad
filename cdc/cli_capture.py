"""CLI verbs for this area; mounted on the main app by cdc.cli."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to ``app``."""
