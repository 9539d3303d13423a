"""Versioned schema migrations shared by every store.

``migrations/NNNN_name.sql`` files are applied in order, each in the
transaction that records it in ``schema_migrations``. Type words that differ
between databases are written as placeholders and replaced per dialect.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True, slots=True)
class Dialect:
    name: str
    replacements: dict[str, str]

    def render(self, sql: str) -> str:
        for placeholder, value in self.replacements.items():
            sql = sql.replace(placeholder, value)
        return sql


SQLITE = Dialect("sqlite", {"BYTEA_OR_BLOB": "BLOB", "AUTO_ID": "INTEGER PRIMARY KEY"})

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


def migrations() -> list[Migration]:
    """All migrations shipped with the package, in version order."""
    found: list[Migration] = []
    for entry in resources.files("itmolink.store.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text()))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise RuntimeError(f"migration {expected:04d} is missing")
    return found


def latest_version() -> int:
    return len(migrations())


def refuse_newer(applied: set[int], where: str) -> None:
    """A database migrated by a newer itmolink is not opened by an older one: the
    old code would not know the new schema's rules. Upgrading is one-way."""
    latest = latest_version()
    newest = max(applied, default=0)
    if newest > latest:
        raise RuntimeError(
            f"{where} has schema version {newest}, newer than this itmolink knows ({latest}): "
            "run the newer itmolink, or restore a backup taken before the upgrade"
        )


def statements(sql: str) -> list[str]:
    """Split a migration into statements (no semicolons inside our literals)."""
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
