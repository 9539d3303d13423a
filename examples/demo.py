"""A real Lao PDR -> Korea ITMO transfer between two itmolink nodes on this machine.

Run with ``make demo``. Everything below goes through the ``itmolink`` command
line, exactly as a registry operator would use it: key material, two node
processes talking gRPC over mutual TLS on loopback, an authorisation, an
issuance and a transfer. The demo exits 0 only if both corresponding
adjustment ledgers agree.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "demo-run"
ITMOLINK = Path(sys.executable).with_name("itmolink")

VINTAGE = 2025
ISSUED = 100_000
TRANSFERRED = 60_000


def say(text: str = "") -> None:
    print(text, flush=True)


def step(title: str, why: str) -> None:
    say()
    say(f"== {title}")
    for line in why.strip().splitlines():
        say(f"   {line.strip()}")


def itmolink(*args: str, capture: bool = False, echo: bool = True) -> str:
    shown = " ".join(a if " " not in a else repr(a) for a in args)
    if echo:
        say(f"$ itmolink {shown}")
    result = subprocess.run(
        [str(ITMOLINK), *args], cwd=WORK, text=True, capture_output=True, check=False
    )
    if result.returncode != 0:
        say(result.stdout + result.stderr)
        raise SystemExit(f"demo failed: 'itmolink {shown}' exited {result.returncode}")
    if not capture:
        for line in result.stdout.rstrip().splitlines():
            say(f"  {line}")
    return result.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(party: str, partner: str, port: int, partner_port: int) -> Path:
    node_dir = WORK / party.lower()
    config = node_dir / "node.toml"
    config.write_text(
        f"""# {party}'s registry node (written by examples/demo.py)
party = "{party}"
registry = "{party}-NR"
database = "{party.lower()}.db"
partner_listen = "127.0.0.1:{port}"
admin_listen = "unix:admin.sock"
transfer_timeout_seconds = 60

[keys]
directory = "pki"

[[partners]]
card = "../{partner.lower()}/pki/card.toml"
endpoint = "127.0.0.1:{partner_port}"
"""
    )
    return config


def start_node(party: str) -> subprocess.Popen[bytes]:
    node_dir = WORK / party.lower()
    log = (node_dir / "node.log").open("wb")
    process = subprocess.Popen(
        [str(ITMOLINK), "node", "run", "--config", "node.toml"],
        cwd=node_dir,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{party} node exited; see {node_dir / 'node.log'}")
        probe = subprocess.run(
            [str(ITMOLINK), "info", "--config", "node.toml"],
            cwd=node_dir,
            capture_output=True,
            check=False,
        )
        if probe.returncode == 0:
            return process
        time.sleep(0.1)
    process.kill()
    raise SystemExit(f"{party} node did not start; see {node_dir / 'node.log'}")


def adjustments(party: str) -> list[dict[str, object]]:
    out = itmolink(
        "show",
        "adjustments",
        "--json",
        "--config",
        f"{party.lower()}/node.toml",
        capture=True,
        echo=False,
    )
    return list(json.loads(out).get("adjustments", []))


def main() -> int:
    if WORK.exists():
        shutil.rmtree(WORK)
    WORK.mkdir()
    say("itmolink demo: Lao PDR (host) transfers ITMOs to Korea (acquiring party)")
    say(f"working directory: {WORK}")

    step(
        "1. Key material",
        """Each registry creates its own CA and node certificate (for mutual TLS) and an
        Ed25519 key that signs every protocol message. The partner card holds only
        public material; each registry pins the other's card.""",
    )
    for party in ("LAO", "KOR"):
        itmolink("pki", "init", "--party", party, "--dir", f"{party.lower()}/pki")

    step(
        "2. Two registry nodes",
        """Each node is its own process with its own SQLite ledger. They talk over gRPC
        with mutual TLS on loopback; operators use a local admin socket.""",
    )
    lao_port, kor_port = free_port(), free_port()
    write_config("LAO", "KOR", lao_port, kor_port)
    write_config("KOR", "LAO", kor_port, lao_port)
    nodes = {party: start_node(party) for party in ("LAO", "KOR")}
    try:
        itmolink("info", "--config", "lao/node.toml")
        itmolink("info", "--config", "kor/node.toml")
        ok = run_transfer()
    finally:
        step("7. Stopping the nodes", "Each node finishes in-flight work and closes its ledger.")
        for process in nodes.values():
            process.send_signal(signal.SIGTERM)
        for party, process in nodes.items():
            try:
                code = process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
            say(f"   {party} node stopped (exit {code}); log: demo-run/{party.lower()}/node.log")
    say()
    if ok:
        say("DEMO PASSED: LAO +60,000 and KOR -60,000 tCO2e for 2025, and the ledgers agree.")
        return 0
    say("DEMO FAILED: the two corresponding adjustment ledgers do not agree.")
    return 1


def run_transfer() -> bool:
    step(
        "3. Authorisation",
        """Lao PDR authorises its 1 GW solar and wind programme under a cooperative
        approach with Korea, for NDC use, vintages 2021-2030. The signed statement
        goes to Korea's node, which checks and acknowledges it (signed).""",
    )
    out = itmolink(
        "authorise",
        "--config",
        "lao/node.toml",
        "--activity-id",
        "LAO-SOLAR-WIND-1GW",
        "--activity-name",
        "1 GW solar and wind",
        "--cooperative-approach",
        "LAO-KOR-A6.2",
        "--acquiring-party",
        "KOR",
        "--purpose",
        "NDC",
        "--vintage-from",
        "2021",
        "--vintage-to",
        "2030",
        "--wait",
        "--quiet",
        capture=True,
    )
    authorisation = out.strip().splitlines()[-1]
    say(f"   authorisation {authorisation}, acknowledged by KOR")
    itmolink("show", "authorisations", "--config", "kor/node.toml")

    step(
        "4. Issuance",
        f"""Lao PDR issues {ISSUED:,} tCO2e of vintage {VINTAGE} into its holding account as one
        serial block (a range of serial numbers, not one row per tonne).""",
    )
    itmolink(
        "issue",
        "--config",
        "lao/node.toml",
        "--authorisation",
        authorisation,
        "--vintage",
        str(VINTAGE),
        "--quantity",
        str(ISSUED),
    )

    step(
        "5. Transfer (two phases, the sender decides)",
        f"""LAO reserves {TRANSFERRED:,} tCO2e (splitting the block) and proposes the transfer.
        KOR checks it and answers with a signed acceptance. In ONE database transaction
        LAO records that acceptance, debits the units and adds {TRANSFERRED:,} to its
        reported emissions (+CA). It then sends a signed completion; in ONE transaction
        KOR records it, credits the units and subtracts {TRANSFERRED:,} (-CA).""",
    )
    itmolink(
        "transfer",
        "--config",
        "lao/node.toml",
        "--to",
        "KOR",
        "--authorisation",
        authorisation,
        "--vintage",
        str(VINTAGE),
        "--quantity",
        str(TRANSFERRED),
        "--wait",
    )
    # The receiver applies its adjustment when the completion arrives, right
    # after the sender's: wait for it rather than race it.
    deadline = time.monotonic() + 20
    while not adjustments("KOR") and time.monotonic() < deadline:
        time.sleep(0.1)

    step("6. Holdings and corresponding adjustments on both sides", "")
    for party in ("LAO", "KOR"):
        say(f"-- {party} holdings")
        itmolink("show", "holdings", "--config", f"{party.lower()}/node.toml")
        say(f"-- {party} corresponding adjustments")
        itmolink("show", "adjustments", "--config", f"{party.lower()}/node.toml")

    lao, kor = adjustments("LAO"), adjustments("KOR")
    say()
    say("Checking the two ledgers against each other:")
    checks = {
        "LAO booked +60,000 for 2025": [(int(str(a["amount"])), a["year"]) for a in lao]
        == [(TRANSFERRED, VINTAGE)],
        "KOR booked -60,000 for 2025": [(int(str(a["amount"])), a["year"]) for a in kor]
        == [(-TRANSFERRED, VINTAGE)],
        "same transfer on both sides": {a["transfer_id"] for a in lao}
        == {a["transfer_id"] for a in kor},
        "each entry cites the partner's signed message": all(
            a.get("evidence_message_id") for a in lao + kor
        ),
    }
    for name, passed in checks.items():
        say(f"   [{'ok' if passed else 'FAILED'}] {name}")
    return all(checks.values())


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
