"""Node configuration (``node.toml``).

Relative paths are resolved against the directory of the configuration file.
``database`` is either a SQLite file or a PostgreSQL URL (libpq syntax,
``postgresql://`` or ``postgres://``), used as written; put no password in
it: libpq reads one from ``passfile=`` or ``PGPASSFILE`` (docs/POSTGRES.md)::

    party = "LAO"                        # ISO 3166-1 alpha-3
    registry = "LAO-NR"                  # this registry's identifier
    database = "lao.db"                  # SQLite file, or e.g.
    # database = "postgresql://itmolink@db.lao.example/lao?passfile=/run/secrets/pgpass"
    partner_listen = "127.0.0.1:50051"   # partner-facing gRPC port (mutual TLS)
    admin_listen = "unix:admin.sock"     # operator interface: a unix socket or a loopback port
    transfer_timeout_seconds = 120       # how long a partner has to accept a proposal
    withdrawal_grace_seconds = 30        # optional: a one-round proposal still unanswered is
                                         # withdrawn this long past expires_at + 2 x
                                         # max_clock_skew_seconds (PROTOCOL.md §6.11 S7)

    [keys]
    directory = "pki"                    # from 'itmolink pki init': node.pem, node.key, signing.key
    node_key = "/run/secrets/node_key"   # optional: the TLS private key elsewhere (default:
    signing_key = "/run/secrets/signing" # directory/node.key, directory/signing.key), e.g. a
                                         # Docker secret; rotated keys go to the directory

    [[partners]]
    card = "../kor/pki/card.toml"        # the partner's public card
    endpoint = "127.0.0.1:50052"         # the partner's partner_listen address
    complete_on_acceptance = false       # optional: true asks the partner to complete each
                                         # transfer when it accepts (one round trip); a
                                         # transfer proposed so is never voided on time-out

    [accounting]                         # optional: how this party accounts for adjustments
    method = "averaging"                 # or "multi-year-trajectory", "multi-year-budget"
    ndc_first_year = 2021                # the NDC period
    ndc_last_year = 2030
    target_year = 2030                   # averaging: the single target year
    target_emissions = 62000000          # averaging: target-year tCO2e; budget: period total
    threshold_per_year = 500000          # most tCO2e first-transferred abroad per year
    threshold_per_period = 3000000       # ... and per NDC period
    [accounting.trajectory]              # multi-year-trajectory: one point per year
    [accounting.reported_emissions]      # reported emissions by year, for 'itmolink report ca'
    2025 = 61000000

    [metrics]                            # optional; no metrics endpoint when absent
    listen = "127.0.0.1:9464"            # Prometheus /metrics over plain HTTP (host:port)

    [limits]                             # optional; these are the defaults
    max_message_bytes = 2097152          # largest envelope accepted
    max_blocks = 10000                   # most blocks in one message
    max_clock_skew_seconds = 300         # sent_at ahead of our clock / expires_at behind it
    max_message_age_days = 30            # older messages are refused
    rate_per_second = 100                # messages accepted per partner per second...
    rate_burst = 200                     # ...with bursts up to this many
    transfer_items_per_second = 1000     # transfers proposed per partner per second (a
    transfer_items_burst = 2000          # batch counts its items); burst at least 1000
"""

from __future__ import annotations

import ipaddress
import os
import stat
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itmolink.core.accounting import AccountingConfig, AccountingMethod, HostThreshold, NdcPeriod
from itmolink.crypto.pki import PartnerCard, PartyFiles, check_party_code, check_registry_id
from itmolink.node.base import MAX_BATCH_ITEMS
from itmolink.store.url import is_postgres_url


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the field."""


@dataclass(frozen=True, slots=True)
class PartnerConfig:
    card: PartnerCard
    endpoint: str
    # Propose each transfer to this partner asking it to complete on acceptance.
    complete_on_acceptance: bool = False


_PARTNER_FIELDS = frozenset({"card", "endpoint", "complete_on_acceptance"})


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    max_message_bytes: int = 2 * 1024 * 1024
    max_blocks: int = 10_000
    max_clock_skew_seconds: int = 300
    max_message_age_days: int = 30
    rate_per_second: int = 100
    rate_burst: int = 200
    transfer_items_per_second: int = 1_000
    transfer_items_burst: int = 2_000


@dataclass(frozen=True, slots=True)
class NodeConfig:
    path: Path
    party: str
    registry: str
    # A SQLite file (Path) or a PostgreSQL URL (str, see is_postgres_url).
    database: Path | str
    partner_listen: str
    admin_listen: str
    transfer_timeout_seconds: int
    keys: PartyFiles
    partners: tuple[PartnerConfig, ...]
    limits: LimitsConfig = LimitsConfig()
    accounting: AccountingConfig | None = None
    threshold: HostThreshold | None = None
    reported_emissions: dict[int, int] = field(default_factory=dict)
    metrics_listen: str | None = None
    # How long past expires_at + 2 x max_clock_skew a one-round proposal still
    # unanswered is withdrawn (PROTOCOL.md §6.11 S7).
    withdrawal_grace_seconds: int = 30

    @property
    def admin_target(self) -> str:
        """The address an operator's client dials."""
        return self.admin_listen


def _field(data: dict[str, Any], name: str, kind: type, path: Path) -> Any:
    if name not in data:
        raise ConfigError(f"{path}: missing field '{name}'")
    value = data[name]
    if not isinstance(value, kind):
        raise ConfigError(f"{path}: field '{name}' must be a {kind.__name__}, not {value!r}")
    return value


def _check_admin(value: str, base: Path, path: Path) -> str:
    if value.startswith("unix:"):
        socket = Path(value.removeprefix("unix:"))
        return f"unix:{(base / socket).resolve() if not socket.is_absolute() else socket}"
    host = value.rsplit(":", 1)[0].strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if not loopback:
        raise ConfigError(
            f"{path}: field 'admin_listen' = {value!r} is not local; the admin interface "
            "listens on a unix socket ('unix:admin.sock') or a loopback address only"
        )
    return value


def check_admin_socket(admin_listen: str) -> None:
    """Refuse a unix-socket ``admin_listen`` whose path holds anything but a socket:
    the node replaces a socket left by an earlier run, and must never remove a file
    or directory that a typo in the configuration points at (its database, a key)."""
    if not admin_listen.startswith("unix:"):
        return
    path = admin_listen.removeprefix("unix:")
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(
            f"admin_listen = {admin_listen!r}: {path} exists and is not a socket; "
            "name a path for the admin socket that holds nothing else"
        )


def load_config(path: Path | str) -> NodeConfig:
    path = Path(path).resolve()
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    base = path.parent
    party = _field(data, "party", str, path)
    try:
        check_party_code(party)
    except ValueError as exc:
        raise ConfigError(f"{path}: field 'party': {exc}") from None
    registry = _field(data, "registry", str, path)
    try:
        check_registry_id(registry)
    except ValueError as exc:
        raise ConfigError(f"{path}: field 'registry': {exc}") from None
    keys = _field(data, "keys", dict, path)
    unknown_keys = set(keys) - {"directory", "node_key", "signing_key"}
    if unknown_keys:
        raise ConfigError(f"{path}: unknown field(s) in [keys]: {', '.join(sorted(unknown_keys))}")
    key_files = {}
    for name in ("node_key", "signing_key"):
        if name in keys:
            key_files[f"{name}_file"] = base / _field(keys, name, str, path)
    partners = []
    for index, entry in enumerate(data.get("partners", [])):
        where = path.with_name(f"{path.name} [[partners]] #{index + 1}")
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: [[partners]] must be an array of tables")
        unknown_partner = set(entry) - _PARTNER_FIELDS
        if unknown_partner:
            raise ConfigError(f"{where}: unknown field(s): {', '.join(sorted(unknown_partner))}")
        one_round = entry.get("complete_on_acceptance", False)
        if not isinstance(one_round, bool):
            raise ConfigError(
                f"{where}: field 'complete_on_acceptance' must be true or false, not {one_round!r}"
            )
        card_path = base / _field(entry, "card", str, where)
        try:
            card = PartnerCard.load(card_path)
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if card.party == party:
            raise ConfigError(f"{where}: the card is this node's own party {party}")
        partners.append(
            PartnerConfig(
                card=card, endpoint=_field(entry, "endpoint", str, where),
                complete_on_acceptance=one_round,
            )
        )  # fmt: skip
    parties = [p.card.party for p in partners]
    if len(set(parties)) != len(parties):
        raise ConfigError(f"{path}: a partner is listed twice in [[partners]]: {sorted(parties)}")
    timeout = data.get("transfer_timeout_seconds", 120)
    if not isinstance(timeout, int) or timeout <= 0:
        raise ConfigError(f"{path}: field 'transfer_timeout_seconds' must be a positive integer")
    grace = data.get("withdrawal_grace_seconds", 30)
    if not isinstance(grace, int) or isinstance(grace, bool) or grace < 0:
        raise ConfigError(f"{path}: field 'withdrawal_grace_seconds' must be an integer, 0 or more")
    limits_table = data.get("limits", {})
    if not isinstance(limits_table, dict):
        raise ConfigError(f"{path}: [limits] must be a table")
    unknown = set(limits_table) - set(LimitsConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) in [limits]: {', '.join(sorted(unknown))}")
    for name, value in limits_table.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{path}: field 'limits.{name}' must be a positive integer")
    limits = LimitsConfig(**limits_table)
    if limits.transfer_items_burst < MAX_BATCH_ITEMS:
        raise ConfigError(
            f"{path}: field 'limits.transfer_items_burst' must be at least {MAX_BATCH_ITEMS}: "
            f"a batched proposal of {MAX_BATCH_ITEMS} transfers would never be accepted"
        )
    accounting, threshold, reported = _accounting(data.get("accounting"), party, path)
    return NodeConfig(
        path=path,
        party=party,
        registry=registry,
        database=_database(_field(data, "database", str, path), base, path),
        partner_listen=_field(data, "partner_listen", str, path),
        admin_listen=_check_admin(_field(data, "admin_listen", str, path), base, path),
        transfer_timeout_seconds=timeout,
        keys=PartyFiles(base / _field(keys, "directory", str, path), **key_files),
        partners=tuple(partners),
        limits=limits,
        accounting=accounting,
        threshold=threshold,
        reported_emissions=reported,
        metrics_listen=_metrics(data.get("metrics"), path),
        withdrawal_grace_seconds=grace,
    )


def check_host_port(value: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port`` for IPv6) with a port of 0-65535."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not host:port")
    return host.strip("[]"), int(port)


def _metrics(table: object, path: Path) -> str | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [metrics] must be a table")
    unknown = set(table) - {"listen"}
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) in [metrics]: {', '.join(sorted(unknown))}")
    listen = _field(table, "listen", str, path)
    try:
        check_host_port(listen)
    except ValueError as exc:
        raise ConfigError(f"{path}: field 'metrics.listen': {exc}") from None
    return str(listen)


def _database(value: str, base: Path, path: Path) -> Path | str:
    if is_postgres_url(value):
        import psycopg
        from psycopg.conninfo import conninfo_to_dict

        try:
            params = conninfo_to_dict(value)
        except psycopg.ProgrammingError as exc:
            raise ConfigError(
                f"{path}: field 'database' is not a valid PostgreSQL URL: {exc}"
            ) from None
        if params.get("password"):
            raise ConfigError(
                f"{path}: field 'database' holds a password; keep it out of the configuration: "
                "use a passfile (passfile=... in the URL, or PGPASSFILE)"
            )
        return value
    if "://" in value:
        raise ConfigError(
            f"{path}: field 'database' = {value.split('://')[0]}://...: only postgresql:// "
            "URLs or SQLite file paths are supported"
        )
    return base / value


_ACCOUNTING_FIELDS = {
    "method", "ndc_number", "ndc_first_year", "ndc_last_year", "target_year", "target_emissions",
    "threshold_per_year", "threshold_per_period", "trajectory", "reported_emissions",
    "baseline_year", "baseline_emissions",
}  # fmt: skip


def _year_table(value: object, name: str, path: Path) -> dict[int, int]:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: [accounting.{name}] must be a table of year = tCO2e")
    try:
        return {int(year): int(amount) for year, amount in value.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{path}: [accounting.{name}] must map years to whole tCO2e") from None


def _accounting(
    table: object, party: str, path: Path
) -> tuple[AccountingConfig | None, HostThreshold | None, dict[int, int]]:
    if table is None:
        return None, None, {}
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [accounting] must be a table")
    unknown = set(table) - _ACCOUNTING_FIELDS
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) in [accounting]: {', '.join(sorted(unknown))}")
    methods = {m.value: m for m in AccountingMethod}
    if table.get("method") not in methods:
        raise ConfigError(
            f"{path}: field 'accounting.method' must be one of {', '.join(sorted(methods))}"
        )
    for name in ("ndc_first_year", "ndc_last_year"):
        if not isinstance(table.get(name), int):
            raise ConfigError(f"{path}: field 'accounting.{name}' must be a year")
    try:
        config = AccountingConfig(
            party=party,
            method=methods[table["method"]],
            ndc_period=NdcPeriod(
                int(table.get("ndc_number", 1)), table["ndc_first_year"], table["ndc_last_year"]
            ),
            target_emissions=int(table.get("target_emissions", 0)),
            target_year=table.get("target_year"),
            trajectory=_year_table(table.get("trajectory", {}), "trajectory", path),
            baseline_year=table.get("baseline_year"),
            baseline_emissions=table.get("baseline_emissions"),
        )
    except ValueError as exc:
        raise ConfigError(f"{path}: [accounting]: {exc}") from None
    threshold = None
    if "threshold_per_year" in table or "threshold_per_period" in table:
        threshold = HostThreshold(
            per_year=table.get("threshold_per_year"), per_period=table.get("threshold_per_period")
        )
    reported = _year_table(table.get("reported_emissions", {}), "reported_emissions", path)
    return config, threshold, reported
