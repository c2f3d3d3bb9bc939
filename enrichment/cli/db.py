"""`enrich db`: schema migrations."""

from __future__ import annotations

import click

from enrichment.cli.base import settings
from enrichment.store.database import Database


@click.group()
def db() -> None:
    """Manage the database schema (Alembic migrations)."""


@db.command()
@click.argument("revision", default="head")
def upgrade(revision: str) -> None:
    """Apply migrations to DATABASE_URL (default: all)."""
    database = Database(settings().database_url)
    database.upgrade(revision)
    click.echo(f"database at revision {database.current_revision()}")


@db.command()
@click.argument("revision")
def downgrade(revision: str) -> None:
    """Revert migrations down to REVISION ('base' removes every table)."""
    database = Database(settings().database_url)
    database.downgrade(revision)
    click.echo(f"database at revision {database.current_revision() or 'base'}")
