"""Test-wide fixtures: the databases the store-level and integration tests run on.

Every test that uses :func:`databases` (directly or through a fixture such as
``pair`` or ``pki``) runs twice: on SQLite and on PostgreSQL, each time on fresh,
empty databases. The PostgreSQL runs share one throwaway cluster started for the
session (tests/pgcluster.py).

Without PostgreSQL binaries the PostgreSQL runs FAIL. On a developer machine,
``ITMOLINK_SKIP_POSTGRES=1`` turns them into skips, listed as such in the
summary; CI never sets it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from itmolink.store import Store, open_store

from .pgcluster import SKIP_ENV, Cluster, PostgresMissing

STORES = ("sqlite", "postgres")


class Databases:
    """Fresh databases of one kind for one test."""

    def __init__(self, kind: str, directory: Path, cluster: Cluster | None) -> None:
        self.kind = kind
        self._directory = directory
        self._cluster = cluster
        self._opened: list[Store] = []

    @property
    def postgres(self) -> bool:
        return self.kind == "postgres"

    def new(self, name: str) -> str:
        """A new database's ``database`` setting: a SQLite path or a PostgreSQL URL."""
        if self._cluster is None:
            return str(self._directory / f"{name}.db")
        return self._cluster.new_database(name.lower().replace("-", "_")[:20])

    def open(self, party: str, registry: str | None = None, name: str | None = None) -> Store:
        """A store on a new database for ``party``."""
        store = open_store(
            self.new(name or party.lower()), party=party, registry=registry or f"{party}-NR"
        )
        self._opened.append(store)
        return store

    def close(self) -> None:
        for store in self._opened:
            store.close()


_cluster: Cluster | None = None
_missing: str | None = None


def postgres_cluster() -> Cluster:
    """The session's throwaway cluster, started on first use."""
    global _cluster, _missing
    if _cluster is None and _missing is None:
        try:
            _cluster = Cluster()
        except PostgresMissing as exc:
            _missing = str(exc)
    if _cluster is None:
        assert _missing is not None
        if os.environ.get(SKIP_ENV):
            pytest.skip(f"PostgreSQL runs skipped ({SKIP_ENV} is set): {_missing}")
        pytest.fail(f"{_missing} (set {SKIP_ENV}=1 to skip the PostgreSQL runs locally)")
    return _cluster


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    global _cluster
    if _cluster is not None:
        _cluster.stop()
        _cluster = None


@pytest.fixture(params=STORES)
def databases(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Databases]:
    kind = str(request.param)
    cluster = postgres_cluster() if kind == "postgres" else None
    found = Databases(kind, tmp_path, cluster)
    yield found
    found.close()
