"""``itmolink node check-config``: everything a node.toml refers to, checked without
starting the node.

Each check gives OK, WARN or FAIL with a detail; the command exits non-zero when
any fails (a warning does not fail it). Nothing is written: the database is opened
read-only and its schema is not migrated.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import sqlite3
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from itmolink.crypto.keys import SigningKey, check_private_file
from itmolink.crypto.operators import load_operators, operators_file
from itmolink.crypto.pki import PartnerCard, check_node_certificate
from itmolink.node.config import (
    ConfigError,
    NodeConfig,
    check_admin_socket,
    check_host_port,
    load_config,
)
from itmolink.store.migrate import latest_version
from itmolink.store.sqlite import read_only_uri

# A node certificate with less than this left is reported (WARN) by check-config.
RENEW_WITHIN = dt.timedelta(days=30)


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False


class _Warning(Exception):
    """The check passes, with something the operator must act on soon."""


class _Failed(Exception):
    pass


def _run(name: str, fn: Callable[[], str]) -> Check:
    try:
        return Check(name, True, fn())
    except _Warning as warning:
        return Check(name, True, str(warning), warning=True)
    except (_Failed, OSError, ValueError, ConfigError, sqlite3.Error) as exc:
        return Check(name, False, str(exc) or type(exc).__name__)


def check_config(path: Path | str, *, now: dt.datetime | None = None) -> list[Check]:
    """Every check, in order; the first failing one that others depend on ends the list."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        config = load_config(path)
    except ConfigError as exc:
        return [Check("configuration", False, str(exc))]
    checks = [
        Check(
            "configuration",
            True,
            f"{config.path}: party {config.party}, registry {config.registry}, "
            f"{len(config.partners)} partner(s)",
        )
    ]
    checks.extend(_checks(config, now))
    return checks


def _checks(config: NodeConfig, now: dt.datetime) -> Iterator[Check]:
    keys = config.keys
    if not keys.directory.is_dir():
        yield Check("key directory", False, f"{keys.directory}: no such directory")
        return
    yield Check("key directory", True, str(keys.directory))
    for label, file in (("TLS private key", keys.node_key), ("signing key", keys.signing_key)):
        yield _run(f"{label} file", lambda file=file: _private(file))  # type: ignore[misc]
    if keys.ca_key.exists():
        yield _run("CA private key file", lambda: _private(keys.ca_key))
    yield _run("node certificate", lambda: _node_certificate(config, now))
    yield _run("own partner card", lambda: _own_card(config))
    yield _run("signing key", lambda: _signing_key(config))
    for partner in config.partners:
        yield _run(
            f"partner {partner.card.party}",
            lambda partner=partner: _partner(  # type: ignore[misc]
                partner.card, partner.endpoint, now, partner.complete_on_acceptance
            ),
        )
    yield _run("partner_listen", lambda: _listen(config.partner_listen))
    yield _run("admin_listen", lambda: _admin(config.admin_listen))
    if config.metrics_listen is not None:
        yield _run("metrics.listen", lambda: _listen(str(config.metrics_listen)))
    yield _run("operators", lambda: _operators(config))
    yield _run("database", lambda: _database(config))


def _private(path: Path) -> str:
    if not path.is_file():
        raise _Failed(f"{path}: no such file")
    check_private_file(path)
    with path.open("rb"):
        pass  # readable by this user
    return f"{path} (mode {path.stat().st_mode & 0o777:o})"


def _load_certificate(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise _Failed(f"{path}: no such file") from None
    except ValueError as exc:
        raise _Failed(f"{path}: not a PEM certificate: {exc}") from None


def _node_certificate(config: NodeConfig, now: dt.datetime) -> str:
    keys = config.keys
    cert = _load_certificate(keys.node_certificate)
    try:
        key = keys.node_key.read_bytes()
    except (FileNotFoundError, PermissionError) as exc:
        raise _Failed(f"{keys.node_key}: {exc.strerror}") from None
    own = _own_card_of(config)
    try:
        check_node_certificate(
            key, keys.node_certificate.read_bytes(), ca_pem=own.ca_certificate_pem, now=now
        )
    except ValueError as exc:
        raise _Failed(f"{keys.node_certificate} (key {keys.node_key}): {exc}") from None
    detail = (
        f"{keys.node_certificate}: matches {keys.node_key.name}, issued by this party's CA, "
        f"valid until {cert.not_valid_after_utc:%Y-%m-%d}"
    )
    left = cert.not_valid_after_utc - now
    if left < RENEW_WITHIN:
        raise _Warning(
            f"{detail}: {left.days} day(s) left; renew it now with 'itmolink pki renew' "
            "(docs/OPERATIONS.md §5)"
        )
    return detail


def _own_card_of(config: NodeConfig) -> PartnerCard:
    try:
        card = PartnerCard.load(config.keys.card)
    except FileNotFoundError:
        raise _Failed(f"{config.keys.card}: no such file") from None
    if (card.party, card.registry) != (config.party, config.registry):
        raise _Failed(
            f"{config.keys.card} is the card of {card.party}/{card.registry}, "
            f"not {config.party}/{config.registry}"
        )
    return card


def _own_card(config: NodeConfig) -> str:
    card = _own_card_of(config)
    return f"{config.keys.card}: keys {', '.join(k.key_id for k in card.signing_keys)}"


def _signing_key(config: NodeConfig) -> str:
    key = SigningKey.load(config.party, config.keys.signing_key)
    card = _own_card_of(config)
    if key.key_id not in {k.key_id for k in card.signing_keys}:
        raise _Failed(
            f"{config.keys.signing_key} (key {key.key_id}) is not in {config.keys.card}: "
            "partners would not verify this node's messages"
        )
    return f"{key.key_id}, listed in the partner card"


def _partner(
    card: PartnerCard, endpoint: str, now: dt.datetime, complete_on_acceptance: bool = False
) -> str:
    ca = x509.load_pem_x509_certificate(card.ca_certificate_pem)
    if not ca.not_valid_before_utc <= now <= ca.not_valid_after_utc:
        raise _Failed(f"the CA certificate of {card.party} is not valid now")
    if not card.signing_keys:
        raise _Failed(f"the card of {card.party} lists no signing key")
    try:
        check_host_port(endpoint)
    except ValueError as exc:
        raise _Failed(f"endpoint {exc}") from None
    return (
        f"card of {card.party}/{card.registry} parses, keys "
        f"{', '.join(k.key_id for k in card.signing_keys)}; endpoint {endpoint}"
        + ("; transfers proposed one-round (complete_on_acceptance)" if complete_on_acceptance
           else "")
    )  # fmt: skip


def _listen(value: str) -> str:
    try:
        host, port = check_host_port(value)
    except ValueError as exc:
        raise _Failed(str(exc)) from None
    try:
        socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise _Failed(f"{value}: cannot resolve {host!r}: {exc.strerror}") from None
    return value


def _admin(value: str) -> str:
    if value.startswith("unix:"):
        directory = Path(value.removeprefix("unix:")).parent
        if not directory.is_dir():
            raise _Failed(f"{value}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise _Failed(f"{value}: cannot create the socket in {directory}")
        try:
            check_admin_socket(value)
        except FileExistsError as exc:
            raise _Failed(str(exc)) from None
        return f"{value} (unix socket, mode 0600)"
    return f"{_listen(value)} (loopback)"


def _operators(config: NodeConfig) -> str:
    path = operators_file(config.keys.directory)
    if not path.exists():
        raise _Failed(f"{path}: no such file: create an operator with 'itmolink operator add'")
    operators = load_operators(config.keys.directory)
    if not operators:
        raise _Failed(f"{path}: no operator: create one with 'itmolink operator add'")
    return f"{path}: {', '.join(sorted(operators.values()))}"


def _database(config: NodeConfig) -> str:
    database = str(config.database)
    if database.startswith(("postgresql:", "postgres:")):
        return _postgres(config, database)
    path = Path(database)
    if not path.exists():
        if not os.access(path.parent, os.W_OK):
            raise _Failed(f"{path} does not exist and {path.parent} is not writable")
        return f"{path} does not exist yet: created at first start"
    conn = sqlite3.connect(read_only_uri(path), uri=True)
    try:
        return _schema(config, _rows(conn), str(path))
    finally:
        conn.close()


def _rows(conn: Any) -> Callable[[str], list[Any]]:
    def query(sql: str) -> list[Any]:
        cursor = conn.execute(sql)
        return list(cursor.fetchall())

    return query


def _postgres(config: NodeConfig, conninfo: str) -> str:
    try:
        import psycopg
    except ImportError:
        raise _Failed("PostgreSQL database, but psycopg is not installed") from None
    try:
        with psycopg.connect(conninfo, connect_timeout=5) as conn:
            conn.read_only = True
            exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
            if exists is None or not exists[0]:
                return "PostgreSQL reachable; the schema is created at first start"
            return _schema(config, _rows(conn), "the PostgreSQL database")
    except psycopg.Error as exc:
        raise _Failed(f"PostgreSQL: {str(exc).strip().splitlines()[0]}") from None


def _schema(config: NodeConfig, query: Callable[[str], list[Any]], where: str) -> str:
    try:
        versions = {int(row[0]) for row in query("SELECT version FROM schema_migrations")}
    except Exception as exc:  # sqlite3 or psycopg: no such table
        raise _Failed(f"{where} is not an itmolink database: {exc}") from None
    latest = latest_version()
    current = max(versions, default=0)
    if current > latest:
        raise _Failed(
            f"{where} has schema version {current}, newer than this itmolink knows ({latest}): "
            "run the newer itmolink, or restore a backup taken before the upgrade"
        )
    meta = {str(k): str(v) for k, v in query("SELECT key, value FROM node_meta")}
    owner = (meta.get("party"), meta.get("registry"))
    if "party" in meta and owner != (config.party, config.registry):
        raise _Failed(f"{where} belongs to {owner[0]}/{owner[1]}, not {config.party}")
    signing = meta.get("signing_key_id")
    if signing:
        rotated = config.keys.directory / f"signing-{signing}.key"
        current_key = SigningKey.load(config.party, config.keys.signing_key)
        if signing != current_key.key_id and not rotated.exists():
            raise _Failed(f"{where} signs with key {signing}, but {rotated} does not exist")
    pending = "" if current == latest else f"; migrations {current + 1}-{latest} run at start"
    return f"{where}: schema version {current} (this itmolink: {latest}){pending}"
