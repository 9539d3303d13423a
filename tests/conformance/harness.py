"""A target node of ours and the kit's configuration for it, for the kit's tests.

The target is a real node (gRPC over mutual TLS on port 0, its own SQLite
ledger); the kit reaches it only through its partner port, and makes it act
only through the driver commands, which run our command line against the
node's admin socket.
"""

from __future__ import annotations

import datetime as dt
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from itmolink.conformance.config import init_kit_identity
from itmolink.crypto.pki import init_party
from itmolink.node.config import load_config
from itmolink.node.runtime import Node

KIT = "XKT"
TARGET = "LAO"
# A target that asks to complete on acceptance withdraws a proposal left unanswered
# past expires_at + 2 x max_clock_skew + its grace (PROTOCOL §6.11 S7): with the node's
# defaults (300 s and 30 s) test 3.09 would wait ten minutes, so that run of the target
# uses a skew of 2 s and a grace of 1 s, stated to the kit in [target] as well.
ONE_ROUND_SKEW_SECONDS = 2
ONE_ROUND_WITHDRAWAL_GRACE_SECONDS = 1
ITMOLINK = Path(sys.executable).with_name("itmolink")

# How our node is driven: our own command line against its admin socket.
DRIVER = {
    "authorise": (
        "{itmolink} authorise --config {node_config} --activity-id {activity_id} "
        "--cooperative-approach {cooperative_approach_id} --acquiring-party {kit_party} "
        "--purpose NDC --vintage-from {vintage_from} --vintage-to {vintage_to} --cap {cap} --quiet"
    ),
    "issue": (
        "{itmolink} issue --config {node_config} --authorisation {authorisation_id} "
        "--vintage {vintage} --quantity {quantity}"
    ),
    "propose_transfer": (
        "{itmolink} transfer --config {node_config} --to {kit_party} "
        "--authorisation {authorisation_id} --vintage {vintage} --quantity {quantity} "
        "--timeout {timeout_seconds}"
    ),
    "propose_batch": (
        "{itmolink} transfer-batch --config {node_config} --to {kit_party} "
        "--authorisation {authorisation_id} --vintage {vintage} --quantity {quantities} "
        "--timeout {timeout_seconds}"
    ),
    "authorise_oimp_at_use": (
        "{itmolink} authorise --config {node_config} --activity-id {activity_id} "
        "--cooperative-approach {cooperative_approach_id} --acquiring-party {kit_party} "
        "--purpose OIMP --oimp-detail {oimp_detail} --first-transfer AT_USE_OR_CANCELLATION "
        "--vintage-from {vintage_from} --vintage-to {vintage_to} --cap {cap} --quiet"
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Setup:
    kit_config: Path
    node_config: Path
    kit_port: int


def prepare(tmp: Path, *, act_within: float = 15.0, one_round: bool = False) -> Setup:
    """Key material for the kit and the target, the target's node.toml (pinning the
    kit's card, whose endpoint is the kit's listening port) and the kit's partner.toml.
    ``one_round``: the target asks the kit to complete on acceptance (PROTOCOL §6.11)."""
    now = dt.datetime.now(dt.UTC)
    init_kit_identity(tmp / "kit", KIT, f"{KIT}-NR", now=now)
    node_dir = tmp / "target"
    init_party(node_dir / "pki", TARGET, f"{TARGET}-NR", now=now)
    kit_port = free_port()
    skew = ONE_ROUND_SKEW_SECONDS if one_round else 300
    grace = ONE_ROUND_WITHDRAWAL_GRACE_SECONDS if one_round else 30
    node_config = node_dir / "node.toml"
    node_config.write_text(
        f'party = "{TARGET}"\nregistry = "{TARGET}-NR"\ndatabase = "target.db"\n'
        'partner_listen = "127.0.0.1:0"\nadmin_listen = "unix:admin.sock"\n'
        f"transfer_timeout_seconds = 60\nwithdrawal_grace_seconds = {grace}\n"
        '[keys]\ndirectory = "pki"\n'
        f"[limits]\nmax_clock_skew_seconds = {skew}\n"
        f'[[partners]]\ncard = "../kit/card.toml"\nendpoint = "127.0.0.1:{kit_port}"\n'
        f"complete_on_acceptance = {str(one_round).lower()}\n"
    )
    driver = "\n".join(f"{name} = {command!r}" for name, command in DRIVER.items())
    kit_config = tmp / "partner.toml"
    kit_config.write_text(
        f'[kit]\nkeys = "kit"\nlisten = "127.0.0.1:{kit_port}"\n\n'
        f'[target]\ncard = "target/pki/card.toml"\nact_within_seconds = {act_within}\n'
        # The node's default [limits] rate and transfer budget (tests 1.20 and 3.22 run
        # only when they are given).
        + "rate_per_second = 100\nrate_burst = 200\n"
        + "transfer_items_per_second = 1000\ntransfer_items_burst = 2000\n"
        # The node's max_clock_skew_seconds and withdrawal grace; it honours
        # complete_on_acceptance always (PROTOCOL §6.11 R1), and asks for it as its
        # [[partners]] entry says.
        + f"max_clock_skew_seconds = {skew}\nwithdrawal_grace_seconds = {grace}\n"
        + "completes_on_acceptance = true\n"
        + f"asks_complete_on_acceptance = {str(one_round).lower()}\n\n"
        f"[driver]\n{driver}\n\n"
        f'[driver.vars]\nitmolink = "{ITMOLINK}"\nnode_config = "{node_config}"\n'
    )
    return Setup(kit_config, node_config, kit_port)


async def start_target(setup: Setup, patch: Callable[[Node], None] | None = None) -> Node:
    """Start the target node in this process; ``patch`` may make it faulty."""
    node = Node(load_config(setup.node_config))
    await node.start()
    if patch is not None:
        patch(node)
    return node
