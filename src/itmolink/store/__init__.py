"""Storage: one interface over SQLite (embedded default) and, later, PostgreSQL.

Every protocol step is one database transaction (:meth:`Store.transaction`).
The schema is versioned: ``migrations/NNNN_*.sql`` are applied in order and
recorded in ``schema_migrations``.
"""

from itmolink.store.sqlite import SqliteStore, Store
from itmolink.store.tx import Tx

__all__ = ["SqliteStore", "Store", "Tx"]
