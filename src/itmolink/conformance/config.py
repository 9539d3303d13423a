"""The conformance kit's configuration (``partner.toml``) and its own identity.

The kit is a partner registry of its own: a party code, a CA and node
certificate for mutual TLS and Ed25519 signing keys, all made by
``itmolink conformance init`` (``itmolink pki init`` plus two extra signing
keys whose validity windows lie in the past and in the future, so that the
target can be shown messages signed by an expired and a not-yet-valid key).
Its partner card is given to the target's operator out of band, exactly as a
real partner's would be.
"""

from __future__ import annotations

import datetime as dt
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from itmolink.crypto.keys import SigningKey, write_private_file
from itmolink.crypto.pki import PartnerCard, PartyFiles, init_party

EXPIRED_KEY_FILE = "conformance-expired.key"
FUTURE_KEY_FILE = "conformance-not-yet-valid.key"

ROLES = ("host", "buyer")


class KitConfigError(ValueError):
    """partner.toml or the kit's key material is not usable."""


@dataclass(frozen=True)
class KitConfig:
    """What ``itmolink conformance run`` needs besides the command line."""

    path: Path
    keys: PartyFiles
    card: PartnerCard
    listen: str
    target_card: PartnerCard
    max_message_bytes: int = 2 * 1024 * 1024
    max_message_age_days: int = 30
    act_within_seconds: float = 20.0
    # The target's agreed request rate (its [limits] rate_per_second and rate_burst):
    # test 1.20 checks its rate limit when both are given.
    rate_per_second: int = 0
    rate_burst: int = 0
    # The target's agreed transfer budget (its [limits] transfer_items_per_second and
    # transfer_items_burst): test 3.22 checks it, in role buyer, when both are given.
    transfer_items_per_second: int = 0
    transfer_items_burst: int = 0
    # The target's [limits] max_clock_skew_seconds: how far past its expires_at a proposal
    # may arrive and still be taken (§5.8 T1b); test 3.25 sends one older than that.
    max_clock_skew_seconds: int = 300
    # The target's grace G and interval I of status queries about transfers it accepted and
    # that outlived their expires_at (PROTOCOL §7.7; the reference's 30 s and 60 s): test
    # 3.26 dates its proposals so that they are left waiting at once when the target's
    # max_clock_skew_seconds allows, else waits G out; it expects no second query within I.
    status_query_grace_seconds: float = 30.0
    status_query_interval_seconds: float = 60.0
    # The one-round transfer (PROTOCOL §6.11). In role buyer: whether the target honours a
    # proposal's complete_on_acceptance (completes in the step that accepts); tests 3.23 and
    # 3.24 expect completed = true if so, a two-phase acceptance if not.
    completes_on_acceptance: bool = False
    # In role host: whether the target's proposals to the kit ask it to complete on
    # acceptance (the target's [[partners]] complete_on_acceptance for the kit). Tests 3.04
    # and 3.08 check the one-round sender then, the two-phase one when not; 3.09 runs only
    # then.
    asks_complete_on_acceptance: bool = False
    # In role host, with asks_complete_on_acceptance: whether the target withdraws a
    # one-round proposal left unanswered (PROTOCOL §6.11 S7, a MAY; the reference does),
    # and how long past expires_at + 2 x max_clock_skew_seconds it waits before it does
    # (the reference's withdrawal_grace_seconds, 30 s by default). Test 3.09 waits that
    # long plus act_within_seconds for the void.
    withdraws_one_round: bool = True
    withdrawal_grace_seconds: float = 30.0
    # How long a driver command may run (a command may wait for a person).
    driver_timeout_seconds: float = 60.0
    # Driver commands by action name, and the user's own placeholder values.
    driver: dict[str, str] = field(default_factory=dict)
    driver_vars: dict[str, str] = field(default_factory=dict)

    @property
    def party(self) -> str:
        return self.card.party

    @property
    def registry(self) -> str:
        return self.card.registry

    @property
    def target_party(self) -> str:
        return self.target_card.party

    def signing_key(self) -> SigningKey:
        return SigningKey.load(self.party, self.keys.signing_key)

    def extra_key(self, name: str) -> SigningKey | None:
        path = self.keys.directory / name
        return SigningKey.load(self.party, path) if path.exists() else None


def _resolve(base: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base / path


def _flag(table: dict[str, object], key: str, path: Path) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise KitConfigError(f"{path}: [target] {key} must be true or false, not {value!r}")
    return value


def load_kit_config(path: Path | str) -> KitConfig:
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise KitConfigError(f"{path}: {exc}") from None
    base = path.parent
    kit = data.get("kit", {})
    target = data.get("target", {})
    driver = data.get("driver", {})
    if not isinstance(kit, dict) or not isinstance(target, dict) or not isinstance(driver, dict):
        raise KitConfigError(f"{path}: [kit], [target] and [driver] must be tables")
    for table, key in (("kit", "keys"), ("target", "card")):
        if not isinstance(data.get(table, {}).get(key), str):
            raise KitConfigError(f"{path}: [{table}] {key} is required (a path)")
    keys = PartyFiles(_resolve(base, kit["keys"]))
    try:
        card = PartnerCard.load(keys.card)
        target_card = PartnerCard.load(_resolve(base, target["card"]))
    except ValueError as exc:
        raise KitConfigError(str(exc)) from None
    if card.party == target_card.party:
        raise KitConfigError(f"{path}: the kit and the target are both {card.party}")
    variables = driver.get("vars", {})
    commands = {k: v for k, v in driver.items() if k != "vars"}
    if not all(isinstance(v, str) for v in commands.values()) or not isinstance(variables, dict):
        raise KitConfigError(f"{path}: [driver] entries are strings; [driver.vars] a table")
    completes = _flag(target, "completes_on_acceptance", path)
    asks = _flag(target, "asks_complete_on_acceptance", path)
    withdraws = target.get("withdraws_one_round", True)
    if not isinstance(withdraws, bool):
        raise KitConfigError(
            f"{path}: [target] withdraws_one_round must be true or false, not {withdraws!r}"
        )
    try:
        config = KitConfig(
            path=path,
            keys=keys,
            card=card,
            listen=str(kit.get("listen", "127.0.0.1:0")),
            target_card=target_card,
            max_message_bytes=int(target.get("max_message_bytes", 2 * 1024 * 1024)),
            max_message_age_days=int(target.get("max_message_age_days", 30)),
            act_within_seconds=float(target.get("act_within_seconds", 20.0)),
            rate_per_second=int(target.get("rate_per_second", 0)),
            rate_burst=int(target.get("rate_burst", 0)),
            transfer_items_per_second=int(target.get("transfer_items_per_second", 0)),
            transfer_items_burst=int(target.get("transfer_items_burst", 0)),
            max_clock_skew_seconds=int(target.get("max_clock_skew_seconds", 300)),
            status_query_grace_seconds=float(target.get("status_query_grace_seconds", 30.0)),
            status_query_interval_seconds=float(target.get("status_query_interval_seconds", 60.0)),
            completes_on_acceptance=completes,
            asks_complete_on_acceptance=asks,
            withdraws_one_round=withdraws,
            withdrawal_grace_seconds=float(target.get("withdrawal_grace_seconds", 30.0)),
            driver_timeout_seconds=float(kit.get("driver_timeout_seconds", 60.0)),
            driver=commands,
            driver_vars={str(k): str(v) for k, v in variables.items()},
        )
    except (TypeError, ValueError) as exc:
        raise KitConfigError(f"{path}: {exc}") from None
    for table, key, value in (
        ("target", "act_within_seconds", config.act_within_seconds),
        ("kit", "driver_timeout_seconds", config.driver_timeout_seconds),
        ("target", "max_message_bytes", config.max_message_bytes),
        ("target", "max_message_age_days", config.max_message_age_days),
        ("target", "max_clock_skew_seconds", config.max_clock_skew_seconds),
        ("target", "status_query_interval_seconds", config.status_query_interval_seconds),
    ):
        if not value > 0:
            raise KitConfigError(f"{path}: [{table}] {key} must be positive, not {value}")
    for key in ("status_query_grace_seconds", "withdrawal_grace_seconds"):
        if not getattr(config, key) >= 0:
            raise KitConfigError(
                f"{path}: [target] {key} must be 0 or more, not {getattr(config, key)}"
            )
    for first, second in (
        ("rate_per_second", "rate_burst"),
        ("transfer_items_per_second", "transfer_items_burst"),
    ):
        for key in (first, second):
            value = getattr(config, key)
            if key in target and not value > 0:
                raise KitConfigError(f"{path}: [target] {key} must be positive, not {value}")
        if bool(getattr(config, first)) != bool(getattr(config, second)):
            raise KitConfigError(f"{path}: [target] give both {first} and {second}, or none")
    return config


def check_role(config: KitConfig, role: str) -> None:
    """What a run in ``role`` needs from the configuration: in role host, a driver
    command for every action but the optional ones (§13.3)."""
    from itmolink.conformance.driver import ACTIONS, OPTIONAL_ACTIONS

    if role not in ROLES:
        raise KitConfigError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    missing = [
        action
        for action in ACTIONS
        if action not in config.driver and action not in OPTIONAL_ACTIONS
    ]
    if role == "host" and missing:
        raise KitConfigError(
            f"{config.path}: role host needs a [driver] command for "
            + ", ".join(missing)
            + " (docs/PROTOCOL.md §13.3)"
        )


def init_kit_identity(
    directory: Path, party: str, registry: str, *, now: dt.datetime
) -> PartyFiles:
    """``pki init`` for the kit, plus an expired and a not-yet-valid signing key
    listed in its card (their private keys stay with the kit)."""
    files = init_party(directory, party, registry, now=now)
    card = PartnerCard.load(files.card)
    expired = SigningKey.generate(party)
    future = SigningKey.generate(party)
    write_private_file(directory / EXPIRED_KEY_FILE, expired.private_pem())
    write_private_file(directory / FUTURE_KEY_FILE, future.private_pem())
    keys = (
        *card.signing_keys,
        expired.verifying_key(
            not_before=now - dt.timedelta(days=60), not_after=now - dt.timedelta(days=30)
        ),
        future.verifying_key(not_before=now + dt.timedelta(days=3650)),
    )
    updated = PartnerCard(card.party, card.registry, card.ca_certificate_pem, keys)
    files.card.write_text(updated.to_toml())
    return files
