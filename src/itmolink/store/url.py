"""Which database a configured ``database`` value names (no driver imported)."""

from __future__ import annotations

URL_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(database: object) -> bool:
    """Whether ``database`` names a PostgreSQL database (a libpq URL), not a SQLite file."""
    return isinstance(database, str) and database.startswith(URL_SCHEMES)


class LedgerUnavailable(RuntimeError):
    """A database that cannot be reached or opened (the message says why)."""
