"""Play a scenario through real nodes and write its tables and charts.

:func:`run_scenario` starts one node *process* per party, all at once (``python -m
itmolink.cli.main node run``; key material from :func:`~itmolink.crypto.pki.init_party`,
a ``node.toml`` with ``[accounting]``, partners over mutual TLS on loopback ports chosen
up front, the admin interface on another loopback port), then drives them through the
admin gRPC API only, authenticated with each party's ``admin`` operator token. It plays
the schedule year by year: authorisations first (waiting for each acquiring party's
acknowledgement), then for each simulated year its issuances, its first transfers and
then its onward transfers (units passed on by an acquiring party), one at a time, each
waited for until both ledgers are final, then the year's uses toward NDCs,
then every node's holdings snapshot of the year. The processes are then stopped
(SIGTERM, then waited for; also when the run fails), and the reports read each node's
SQLite database read-only.

The nodes run on the real clock (partners refuse messages far from their own clock);
simulated years are data only: vintages, booking years, and the dates written in the
AEF tables, which map every action to the simulated year it was played in. Operations
run one at a time in the scenario's order (shuffled within a year by ``seed``), so
transfer ids, ledgers and tables are the same bytes for the same file and seed.

Output (``out_dir``)::

    summary.csv  summary.txt          one row per party: mitigation, transfers, target
                                      (summary.txt also lists the checks that passed)
    authorisations.csv                one row per authorisation: its purposes, when its
                                      host adjusts by the rules, what was issued, moved
                                      and used, and the net adjustments of its host and
                                      of its acquiring parties the run was checked against
    transfers.csv  refusals.csv       every scheduled transfer and the ones refused
    uses.csv                          every scheduled use toward an NDC or voluntary
                                      cancellation, and its outcome (used, cancelled or
                                      the refusal's code)
    <PARTY>/ca-ledger.csv             the corresponding adjustments booked by the node
    <PARTY>/balance.csv               the numbers behind the chart, by year
    <PARTY>/aef/                      the five AEF tables for each year, CSV and XLSX
    <PARTY>/chart.png  chart.svg      only when matplotlib is importable
"""

from __future__ import annotations

import asyncio
import bisect
import csv
import datetime as dt
import io
import itertools
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from itmolink.admin.v1 import admin_pb2, admin_pb2_grpc
from itmolink.core.accounting import (
    AccountingConfig,
    AccountingMethod,
    BalanceReport,
    emissions_balance,
)
from itmolink.core.adjustments import AdjustmentEntry
from itmolink.core.aef import (
    AefReport,
)
from itmolink.core.transfer import TransferState
from itmolink.crypto.operators import read_token, token_file
from itmolink.crypto.pki import init_party
from itmolink.reports import write_aef
from itmolink.reports.build import build_aef
from itmolink.sim.scenario import Party, Scenario
from itmolink.store.sqlite import read_only_uri
from itmolink.store.tx import HeldBlock, Tx
from itmolink.v1 import common_pb2

Progress = Callable[[str, int, int], None]  # (label, done, total)

WAIT_SECONDS = 30.0
POLL_SECONDS = 0.005
START_SECONDS = 60.0  # for every node process to answer on its admin port
STOP_SECONDS = 10.0  # after SIGTERM, before SIGKILL
CALL_SECONDS = 10.0  # per admin call
# The scenario's first-transfer point of OIMP units, as the authorisation defines it.
FIRST_TRANSFER_DEFINITIONS = {
    "": common_pb2.FIRST_TRANSFER_DEFINITION_UNSPECIFIED,
    "authorisation": common_pb2.FIRST_TRANSFER_DEFINITION_AT_AUTHORISATION,
    "issuance": common_pb2.FIRST_TRANSFER_DEFINITION_AT_ISSUANCE,
    "use": common_pb2.FIRST_TRANSFER_DEFINITION_AT_USE_OR_CANCELLATION,
}
PURPOSES = {"NDC": common_pb2.PURPOSE_NDC, "OIMP": common_pb2.PURPOSE_OIMP}
# The outcome recorded for a use the node carried out, by action.
USE_RESULTS = {"use-ndc": "used", "use-oimp": "used-oimp", "voluntary-cancellation": "cancelled"}
REJECTION_CODE_KEY = "itmolink-rejection-code"


class SimulationError(RuntimeError):
    """The run could not complete, or an invariant does not hold."""


@dataclass(frozen=True, slots=True)
class PartySummary:
    party: str
    name: str
    method: str
    mitigation: int  # the party's activities over the scenario years
    issued: int
    transferred_out: int  # first transferred to other parties (completed)
    acquired: int  # received by transfers, first or onward (completed)
    passed_on: int  # acquired units transferred on to other parties (completed)
    used: int  # acquired units used toward the party's NDC (retired)
    used_oimp: int  # units the party used for OIMP (retired)
    cancelled: int  # units the party cancelled voluntarily
    adjustments: int  # net corresponding adjustments booked (+ host, - buyer)
    met: bool | None  # target met after adjustments (None: cannot tell)
    met_without_adjustments: bool | None

    @property
    def share_leaving(self) -> str:
        """The share of the party's own mitigation that leaves with transfers."""
        if not self.mitigation:
            return "-"
        return f"{100 * self.transferred_out / self.mitigation:.1f}%"


@dataclass(frozen=True, slots=True)
class Summary:
    scenario: str
    seed: int
    out_dir: Path
    parties: tuple[PartySummary, ...]
    transfers_completed: int
    transfers_refused: int
    invariants: tuple[str, ...] = field(default=())  # the checks that passed

    def table(self) -> str:
        """The summary as a plain-text table."""
        headers = ("party", "method", "mitigation", "issued", "transferred out", "leaves",
                   "acquired", "passed on", "used", "used OIMP", "cancelled", "net CA",
                   "target met", "without CA")  # fmt: skip
        rows = [
            (p.party, p.method, f"{p.mitigation:,}", f"{p.issued:,}", f"{p.transferred_out:,}",
             p.share_leaving, f"{p.acquired:,}", f"{p.passed_on:,}", f"{p.used:,}",
             f"{p.used_oimp:,}", f"{p.cancelled:,}", f"{p.adjustments:+,}", _verdict(p.met),
             _verdict(p.met_without_adjustments))
            for p in self.parties
        ]  # fmt: skip
        widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
        lines = [
            f"{self.scenario} (seed {self.seed}): {self.transfers_completed} transfers "
            f"completed, {self.transfers_refused} refused",
            "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip(),
        ]
        for row in rows:
            lines.append(
                "  ".join(
                    v.ljust(w) if i < 2 else v.rjust(w)
                    for i, (v, w) in enumerate(zip(row, widths, strict=True))
                ).rstrip()
            )
        return "\n".join(lines) + "\n"


def _verdict(met: bool | None) -> str:
    return "open" if met is None else ("yes" if met else "NO")


def accounting_config(party: Party) -> AccountingConfig:
    from itmolink.core.accounting import NdcPeriod

    ndc = party.ndc
    return AccountingConfig(
        party=party.code,
        method=AccountingMethod(ndc.method),
        ndc_period=NdcPeriod(1, ndc.first_year, ndc.last_year),
        target_emissions=ndc.target_emissions,
        target_year=ndc.target_year,
        trajectory=dict(ndc.trajectory),
        baseline_year=ndc.baseline_year,
        baseline_emissions=ndc.baseline_emissions,
    )


def _node_toml(party: Party, partners: Iterable[str], ports: dict[str, tuple[int, int]]) -> str:
    """``ports``: the (partner port, admin port) of every party."""
    ndc = party.ndc
    lines = [
        f'party = "{party.code}"',
        f'registry = "{party.registry}"',
        f'database = "{party.code.lower()}.db"',
        f'partner_listen = "127.0.0.1:{ports[party.code][0]}"',
        f'admin_listen = "127.0.0.1:{ports[party.code][1]}"',
        "transfer_timeout_seconds = 120",
        '[keys]\ndirectory = "pki"',
        "[limits]\nrate_per_second = 100000\nrate_burst = 100000",
        "transfer_items_per_second = 1000000\ntransfer_items_burst = 1000000",
        "[accounting]",
        f'method = "{ndc.method}"',
        f"ndc_first_year = {ndc.first_year}",
        f"ndc_last_year = {ndc.last_year}",
        f"target_emissions = {ndc.target_emissions}",
    ]
    if ndc.target_year is not None:
        lines.append(f"target_year = {ndc.target_year}")
    if ndc.baseline_year is not None:
        lines.append(f"baseline_year = {ndc.baseline_year}")
    if ndc.baseline_emissions is not None:
        lines.append(f"baseline_emissions = {ndc.baseline_emissions}")
    if party.threshold is not None:
        if party.threshold.per_year is not None:
            lines.append(f"threshold_per_year = {party.threshold.per_year}")
        if party.threshold.per_period is not None:
            lines.append(f"threshold_per_period = {party.threshold.per_period}")
    if ndc.trajectory:
        lines.append("[accounting.trajectory]")
        lines.extend(f"{y} = {v}" for y, v in sorted(ndc.trajectory.items()))
    lines.append("[accounting.reported_emissions]")
    lines.extend(f"{y} = {v}" for y, v in sorted(ndc.reported_emissions.items()))
    # [[partners]] after every table of [accounting] would be read as part of it: put them
    # first by returning them separately.
    head = lines[:8]
    tail = lines[8:]
    partner_lines = [
        f'[[partners]]\ncard = "../{p.lower()}/pki/card.toml"\nendpoint = "127.0.0.1:{ports[p][0]}"'
        for p in partners
    ]
    return "\n".join([*head[:6], *partner_lines, *head[6:], *tail]) + "\n"


class _Clock:
    """Maps wall-clock microseconds of the run to the simulated date of that moment."""

    def __init__(self) -> None:
        self._marks: list[int] = []
        self._dates: list[dt.date] = []

    def mark(self, date: dt.date) -> None:
        self._marks.append(time.time_ns() // 1000)
        self._dates.append(date)

    def date(self, micros: int) -> dt.date:
        index = bisect.bisect_right(self._marks, micros) - 1
        return self._dates[max(0, index)]


@dataclass
class _Outcome:
    transfers: list[tuple[int, str, str, str, str, int, int, str]] = field(default_factory=list)
    refusals: list[tuple[int, str, str, str, int, int, str]] = field(default_factory=list)
    # (year, authorisation, party, vintage, quantity, outcome: "used" or the refusal)
    uses: list[tuple[int, str, str, int, int, str]] = field(default_factory=list)


def _free_ports(count: int) -> list[int]:
    """``count`` distinct free loopback ports (all held open until all are chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            sockets.append(s)
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _rejection(exc: grpc.aio.AioRpcError) -> str | None:
    """The rejection code name a refused admin call carries, e.g. ``UNKNOWN_TRANSFER``."""
    metadata: Any = exc.trailing_metadata() or ()  # (key, value) pairs
    for key, value in metadata:
        if key == REJECTION_CODE_KEY:
            return str(value).removeprefix("REJECTION_CODE_")
    return None


class _NodeProcess:
    """One party's node, run as ``itmolink node run`` in its own process."""

    def __init__(self, party: Party, directory: Path, admin_port: int) -> None:
        self.party = party.code
        self.registry = party.registry
        self.directory = directory
        self.config = directory / "node.toml"
        self.database = directory / f"{party.code.lower()}.db"
        self.log = directory / "node.log"
        self.process: subprocess.Popen[bytes] | None = None
        self._channel = grpc.aio.insecure_channel(f"127.0.0.1:{admin_port}")
        self.admin = admin_pb2_grpc.AdminServiceStub(self._channel)
        token = read_token(token_file(directory / "pki", "admin"))
        self.metadata = (("authorization", f"Bearer {token}"),)

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 (this interpreter, our arguments)
                [sys.executable, "-m", "itmolink.cli.main", "node", "run", "--config",
                 str(self.config), "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip

    def _failed(self, what: str) -> SimulationError:
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        return SimulationError(f"node {self.party}: {what}\n{tail}".rstrip())

    async def wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        while True:
            if self.process.poll() is not None:
                raise self._failed(f"exited with status {self.process.returncode} at start-up")
            try:
                await self.admin.GetNodeInfo(
                    admin_pb2.GetNodeInfoRequest(), metadata=self.metadata, timeout=1
                )
                return
            except grpc.aio.AioRpcError:
                if time.monotonic() > deadline:
                    raise self._failed(f"not answering within {START_SECONDS:.0f} s") from None
                await asyncio.sleep(0.05)

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def wait_stopped(self) -> None:
        if self.process is None:
            return
        try:
            self.process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    async def close(self) -> None:
        await self._channel.close(None)


class _Network:
    def __init__(self, scenario: Scenario, root: Path) -> None:
        self.scenario = scenario
        self.root = root
        self.nodes: dict[str, _NodeProcess] = {}

    async def start(self) -> None:
        links: dict[str, set[str]] = defaultdict(set)
        for host, buyer in self.scenario.links():
            links[host].add(buyer)
            links[buyer].add(host)
        parties = self.scenario.parties
        free = _free_ports(2 * len(parties))
        ports = {p.code: (free[2 * i], free[2 * i + 1]) for i, p in enumerate(parties)}
        now = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
        for party in parties:
            directory = self.root / party.code.lower()
            init_party(directory / "pki", party.code, party.registry, now=now)
            (directory / "node.toml").write_text(
                _node_toml(party, sorted(links[party.code]), ports)
            )
        for party in parties:
            node = _NodeProcess(party, self.root / party.code.lower(), ports[party.code][1])
            self.nodes[party.code] = node
            node.start()
        deadline = time.monotonic() + START_SECONDS
        waits = [asyncio.ensure_future(n.wait_ready(deadline)) for n in self.nodes.values()]
        try:
            await asyncio.gather(*waits)
        finally:  # one node failed: stop waiting for the others
            for wait in waits:
                wait.cancel()
            await asyncio.gather(*waits, return_exceptions=True)

    async def stop(self) -> None:
        """SIGTERM every node, then wait for each (SIGKILL after ``STOP_SECONDS``)."""
        for node in self.nodes.values():
            node.terminate()
        for node in self.nodes.values():
            await asyncio.to_thread(node.wait_stopped)
        for node in self.nodes.values():
            await node.close()


async def _transfer_state(node: _NodeProcess, transfer_id: str) -> TransferState | None:
    try:
        response = await node.admin.GetTransfer(
            admin_pb2.GetTransferRequest(transfer_id=transfer_id),
            metadata=node.metadata,
            timeout=CALL_SECONDS,
        )
    except grpc.aio.AioRpcError as exc:
        if _rejection(exc) == "UNKNOWN_TRANSFER":
            return None
        raise
    return TransferState(response.transfer.state)


async def _final(
    nodes: dict[str, _NodeProcess], sender: str, receiver: str, transfer_id: str
) -> str:
    """Wait until both sides of a transfer are final; its state at the sender."""
    a, b = nodes[sender], nodes[receiver]
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        state = await _transfer_state(a, transfer_id)
        if state is not None and state.is_final:
            if state is not TransferState.COMPLETED:
                return state.name.lower()
            if await _transfer_state(b, transfer_id) is TransferState.COMPLETED:
                return state.name.lower()
        if time.monotonic() > deadline:
            raise SimulationError(f"transfer {transfer_id} {sender}->{receiver} not final")
        await asyncio.sleep(POLL_SECONDS)


async def _acknowledged(node: _NodeProcess, authorisation_id: str) -> bool:
    response = await node.admin.ListAuthorisations(
        admin_pb2.ListAuthorisationsRequest(), metadata=node.metadata, timeout=CALL_SECONDS
    )
    for view in response.authorisations:
        if view.authorisation_id == authorisation_id and view.host_party == node.party:
            states = dict(view.party_states)
            return bool(states) and all(s == "acknowledged" for s in states.values())
    return False


async def _booked_on_notices(node: _NodeProcess, transfers: set[str], from_notices: int) -> None:
    """Wait until the host has booked ``from_notices`` tCO2e on its holders' notices:
    entries with a partner that belong to none of ``transfers`` (the run's so far)."""
    deadline = time.monotonic() + WAIT_SECONDS
    while True:
        response = await node.admin.ListAdjustments(
            admin_pb2.ListAdjustmentsRequest(), metadata=node.metadata, timeout=CALL_SECONDS
        )
        booked = sum(
            a.amount for a in response.adjustments if a.partner and a.transfer_id not in transfers
        )
        if booked >= from_notices:
            return
        if time.monotonic() > deadline:
            raise SimulationError(
                f"{node.party} booked {booked} tCO2e on first-transfer notices, not {from_notices}"
            )
        await asyncio.sleep(10 * POLL_SECONDS)  # each poll reads the whole ledger


async def _last_outgoing(node: _NodeProcess) -> str:
    response = await node.admin.ListTransfers(
        admin_pb2.ListTransfersRequest(), metadata=node.metadata, timeout=CALL_SECONDS
    )
    return max(t.transfer_id for t in response.transfers if t.direction == "out")


async def _play(
    scenario: Scenario, net: _Network, clock: _Clock, seed: int, progress: Progress | None
) -> _Outcome:
    nodes = net.nodes
    outcome = _Outcome()
    ids: dict[str, str] = {}
    total = (
        len(scenario.authorisations)
        + len(scenario.issuances)
        + len(scenario.transfers)
        + len(scenario.uses)
    )
    done = 0

    def step(label: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(label, done, total)

    clock.mark(dt.date(scenario.first_year, 1, 1))
    for spec in scenario.authorisations:
        node = nodes[spec.host]
        activity = scenario.activity(spec.activity)
        response = await node.admin.Authorise(
            admin_pb2.AuthoriseRequest(
                activity_id=activity.id, activity_name=activity.name,
                cooperative_approach_id=spec.cooperative_approach,
                acquiring_parties=list(spec.acquiring),
                purposes=[PURPOSES[p] for p in spec.purposes],
                oimp_detail=spec.oimp_detail,
                first_transfer_definition=FIRST_TRANSFER_DEFINITIONS[spec.first_transfer],
                vintage_from=spec.vintage_from, vintage_to=spec.vintage_to,
                quantity_cap=spec.quantity_cap, unit_type=common_pb2.UNIT_TYPE_ITMO,
                buyer_share_bp=spec.buyer_share_bp,
            ),
            metadata=node.metadata, timeout=CALL_SECONDS,
        )  # fmt: skip
        ids[spec.id] = response.authorisation_id
        deadline = time.monotonic() + WAIT_SECONDS
        while not await _acknowledged(node, ids[spec.id]):
            if time.monotonic() > deadline:
                raise SimulationError(f"authorisation {spec.id} not acknowledged")
            await asyncio.sleep(POLL_SECONDS)
        step(f"authorised {spec.id}")

    rng = random.Random(seed)  # noqa: S311 (an order of play, not a secret)
    # Per host: the tCO2e of its OIMP units its holders have used so far, whose
    # adjustment the host books on their first-transfer notices.
    noticed: dict[str, int] = defaultdict(int)
    for year in scenario.years:
        clock.mark(dt.date(year, 7, 1))
        for issuance in [x for x in scenario.issuances if x.year == year]:
            spec = scenario.authorisation(issuance.authorisation)
            node = nodes[spec.host]
            await node.admin.Issue(
                admin_pb2.IssueRequest(
                    authorisation_id=ids[spec.id], vintage=issuance.vintage,
                    quantity=issuance.quantity,
                ),
                metadata=node.metadata, timeout=CALL_SECONDS,
            )  # fmt: skip
            share = scenario.buyer_share(issuance)
            if share:
                # The buyer's share left in the issuance's transaction: wait for it.
                (buyer,) = spec.acquiring
                transfer_id = await _last_outgoing(node)
                state = await _final(nodes, spec.host, buyer, transfer_id)
                outcome.transfers.append(
                    (year, transfer_id, spec.id, spec.host, buyer, issuance.vintage, share, state)
                )
            step(f"{year} issued {issuance.quantity:,} {spec.id}")
        # First transfers, then onward ones: units may move on in the year they arrive.
        firsts = [t for t in scenario.transfers if t.year == year and not scenario.onward(t)]
        onwards = [t for t in scenario.transfers if t.year == year and scenario.onward(t)]
        rng.shuffle(firsts)
        rng.shuffle(onwards)
        for transfer in [*firsts, *onwards]:
            node = nodes[transfer.from_party]
            try:
                proposed = await node.admin.Transfer(
                    admin_pb2.TransferRequest(
                        to_party=transfer.to_party,
                        authorisation_id=ids[transfer.authorisation],
                        vintage=transfer.vintage,
                        quantity=transfer.quantity,
                        host_party=scenario.authorisation(transfer.authorisation).host,
                    ),
                    metadata=node.metadata,
                    timeout=CALL_SECONDS,
                )
            except grpc.aio.AioRpcError as exc:
                code = _rejection(exc)
                if code is None:
                    raise
                detail = (exc.details() or "").removeprefix("REJECTION_CODE_")
                outcome.refusals.append(
                    (year, transfer.authorisation, transfer.from_party, transfer.to_party,
                     transfer.vintage, transfer.quantity, detail)
                )  # fmt: skip
                step(f"{year} refused {transfer.authorisation}")
                continue
            transfer_id = proposed.transfer_id
            state = await _final(nodes, transfer.from_party, transfer.to_party, transfer_id)
            outcome.transfers.append(
                (year, transfer_id, transfer.authorisation, transfer.from_party,
                 transfer.to_party, transfer.vintage, transfer.quantity, state)
            )  # fmt: skip
            step(f"{year} {transfer.from_party}->{transfer.to_party} {transfer.quantity:,}")
        for use in [u for u in scenario.uses if u.year == year]:
            spec = scenario.authorisation(use.authorisation)
            node = nodes[use.party]
            try:
                await node.admin.Retire(
                    admin_pb2.RetireRequest(
                        action=use.action, host_party=spec.host, authorisation_id=ids[spec.id],
                        vintage=use.vintage, quantity=use.quantity,
                        use_year=year if use.action == "use-ndc" else 0,
                        oimp_purpose=spec.oimp_detail if use.action == "use-oimp" else "",
                    ),
                    metadata=node.metadata, timeout=CALL_SECONDS,
                )  # fmt: skip
            except grpc.aio.AioRpcError as exc:
                code = _rejection(exc)
                if code is None:
                    raise
                result = (exc.details() or "").removeprefix("REJECTION_CODE_")
            else:
                result = USE_RESULTS[use.action]
                if use.action == "use-oimp" and spec.ca_point == "use" and use.party != spec.host:
                    # The holder's first-transfer notice books the host's adjustment.
                    noticed[spec.host] += use.quantity
                    known = {t[1] for t in outcome.transfers}
                    await _booked_on_notices(nodes[spec.host], known, noticed[spec.host])
            outcome.uses.append(
                (year, use.authorisation, use.party, use.vintage, use.quantity, result)
            )
            step(f"{year} {use.party} {result} {use.quantity:,} {use.authorisation}")
        await asyncio.gather(
            *(
                node.admin.SnapshotHoldings(
                    admin_pb2.SnapshotHoldingsRequest(year=year),
                    metadata=node.metadata,
                    timeout=CALL_SECONDS,
                )
                for node in nodes.values()
            )
        )
    clock.mark(dt.date(scenario.last_year, 12, 31))
    return outcome


# -- invariants ----------------------------------------------------------------------------


@dataclass
class _Ledger:
    """What the reports and checks need from one node, read on its database thread."""

    holdings: list[HeldBlock]
    entries: list[AdjustmentEntry]
    amounts: dict[str, list[tuple[int, int]]]
    aef: list[AefReport]


def _collect(
    node: _NodeProcess,
    accounting: AccountingConfig,
    years: range,
    clock: _Clock,
    transfer_ids: list[str],
) -> _Ledger:
    """Read a stopped node's ledger, read-only."""
    conn = sqlite3.connect(read_only_uri(node.database), uri=True)
    try:
        tx = Tx(conn)
        holdings = tx.holdings()
        entries = [r.entry for r in tx.adjustments()]
        amounts = {t: tx.adjustment_amounts(t) for t in transfer_ids}
        aef = [_aef(tx, node.party, node.registry, accounting, year, clock) for year in years]
    finally:
        conn.close()
    return _Ledger(holdings, entries, amounts, aef)


@dataclass
class ExpectedAdjustments:
    """What the rules say each party books, from the scenario and the run's outcome."""

    # transfer id -> (the sender's, the receiver's) sorted (vintage, amount) entries
    transfers: dict[str, tuple[list[tuple[int, int]], list[tuple[int, int]]]] = field(
        default_factory=dict
    )
    # party -> vintage -> net amount booked without a transfer (nonzero only)
    without_transfer: dict[str, dict[int, int]] = field(default_factory=dict)
    totals: dict[str, int] = field(default_factory=dict)  # party -> net of every entry
    # party -> why its entries without a transfer were booked -> tCO2e
    why: dict[str, dict[str, int]] = field(default_factory=dict)
    # authorisation -> (the host's net, the acquiring parties' net) by the rules
    by_authorisation: dict[str, tuple[int, int]] = field(default_factory=dict)


def expected_adjustments(scenario: Scenario, outcome: _Outcome) -> ExpectedAdjustments:
    """The corresponding adjustments the rules call for (docs/DESIGN.md decisions 26, 58).

    - Units authorised for use toward an NDC, alone or with OIMP, are first transferred
      at the host's first international transfer: every completed transfer of them
      books +quantity at the sender (the host, or an acquiring party passing them on)
      and -quantity at the receiver, for the vintage, whatever the OIMP definition.
    - Units authorised for OIMP only move without an adjustment. Their host books
      +quantity at issuance (first transfer at authorisation or issuance) or when they
      are used for OIMP, by itself or by a holder (first transfer at use).
    - Units authorised for both that the host uses for OIMP itself were never adjusted
      (they never left): that use is their first transfer, +quantity, whatever the OIMP
      definition. An acquiring party that uses such units for OIMP gives back the
      -quantity it booked when it acquired them: +quantity (decision 59).
    - Uses toward an NDC and voluntary cancellations book nothing; nor does anything
      refused or voided.
    """
    result = ExpectedAdjustments()
    without: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    why: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    totals: dict[str, int] = defaultdict(int)
    host_net: dict[str, int] = defaultdict(int)
    acquirers_net: dict[str, int] = defaultdict(int)
    for _, transfer_id, key, sender, receiver, vintage, quantity, state in outcome.transfers:
        spec = scenario.authorisation(key)
        if state != "completed" or not spec.ndc:
            result.transfers[transfer_id] = ([], [])
            continue
        result.transfers[transfer_id] = ([(vintage, quantity)], [(vintage, -quantity)])
        totals[sender] += quantity
        totals[receiver] -= quantity
        if sender == spec.host:
            host_net[key] += quantity
        else:
            acquirers_net[key] += quantity
        acquirers_net[key] -= quantity
    for issuance in scenario.issuances:
        spec = scenario.authorisation(issuance.authorisation)
        if spec.oimp_only and spec.first_transfer in ("authorisation", "issuance"):
            without[spec.host][issuance.vintage] += issuance.quantity
            why[spec.host]["at issuance"] += issuance.quantity
            host_net[spec.id] += issuance.quantity
    for _, key, party, vintage, quantity, result_of_use in outcome.uses:
        spec = scenario.authorisation(key)
        if result_of_use != "used-oimp":
            continue
        if spec.both:
            without[party][vintage] += quantity
            if party == spec.host:
                why[party]["at its own use"] += quantity
                host_net[key] += quantity
            else:
                why[party]["given back at its use for OIMP"] += quantity
                acquirers_net[key] += quantity
        elif spec.oimp_only and spec.first_transfer == "use":
            without[spec.host][vintage] += quantity
            why[spec.host]["at its own use" if party == spec.host else "on notices"] += quantity
            host_net[key] += quantity
    result.by_authorisation = {
        a.id: (host_net[a.id], acquirers_net[a.id]) for a in scenario.authorisations
    }
    for party, by_vintage in without.items():
        result.without_transfer[party] = {y: a for y, a in by_vintage.items() if a}
        totals[party] += sum(by_vintage.values())
    result.totals = dict(totals)
    result.why = {p: dict(w) for p, w in why.items()}
    return result


def _check_invariants(
    scenario: Scenario, ledgers: dict[str, _Ledger], outcome: _Outcome
) -> list[str]:
    passed: list[str] = []
    # Conservation: every issued serial of a host registry is held exactly once somewhere.
    issued: dict[str, int] = defaultdict(int)
    for issuance in scenario.issuances:
        host = scenario.authorisation(issuance.authorisation).host
        issued[scenario.party(host).registry] += issuance.quantity
    ranges: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for party, ledger in ledgers.items():
        for held in ledger.holdings:
            block = held.block
            ranges[block.originating_registry].append((block.serial_start, block.serial_end))
            if held.status != "held":
                raise SimulationError(
                    f"{party}: block {block.label()} still {held.status} after the run"
                )
    for registry in sorted(set(issued) | set(ranges)):
        spans = sorted(ranges[registry])
        for (_, end), (start, _) in itertools.pairwise(spans):
            if start <= end:
                raise SimulationError(f"{registry}: serials {start}-{end} are held twice")
        held_total = sum(e - s + 1 for s, e in spans)
        if held_total != issued[registry]:
            raise SimulationError(
                f"{registry}: {issued[registry]} tCO2e issued but {held_total} held in all "
                "registries together"
            )
        passed.append(f"conservation {registry}: {held_total} tCO2e issued, each held once")
    # Every transfer, and every party's entries without a transfer, against the rules
    # applied to the schedule and the outcome (expected_adjustments), never the node's
    # own view of when its units are first transferred.
    expected = expected_adjustments(scenario, outcome)
    for transfer in outcome.transfers:
        _, transfer_id, authorisation, sender, receiver, vintage, quantity, state = transfer
        plus = ledgers[sender].amounts[transfer_id]
        minus = ledgers[receiver].amounts[transfer_id]
        want_plus, want_minus = expected.transfers.get(transfer_id, ([], []))
        if sorted(plus) != want_plus or sorted(minus) != want_minus:
            spec = scenario.authorisation(authorisation)
            raise SimulationError(
                f"{transfer_id} ({state}, {quantity} tCO2e of {vintage} of {spec.id}, "
                f"{' and '.join(spec.purposes)}): adjustments {plus} at {sender} and {minus} at "
                f"{receiver}, expected {want_plus} and {want_minus}"
            )
    completed = [t for t in outcome.transfers if t[7] == "completed"]
    oimp = sum(1 for t in completed if scenario.authorisation(t[2]).oimp_only)
    both = sum(1 for t in completed if scenario.authorisation(t[2]).both)
    passed.append(
        f"{len(completed) - oimp} completed transfers with equal and opposite adjustments"
        + (f" ({both} of units for NDC and OIMP, booked at the transfer)" if both else "")
        + (f", {oimp} of OIMP units with none" if oimp else "")
    )
    # The adjustments without a transfer: the host's for OIMP units first transferred at
    # issuance or at use (its own, or a holder's on its notice), and nothing else.
    for party, ledger in ledgers.items():
        # An entry of no transfer names its issuance, notice or use instead (Tx.adjustments).
        booked: dict[int, int] = defaultdict(int)
        for e in ledger.entries:
            if e.transfer_id not in ledger.amounts:
                booked[e.year] += e.amount
        want = expected.without_transfer.get(party, {})
        if {y: a for y, a in booked.items() if a} != want:
            raise SimulationError(
                f"{party}: adjustments without a transfer {dict(sorted(booked.items()))} by "
                f"vintage, expected {dict(sorted(want.items()))} (the host's for OIMP units "
                "first transferred at issuance or at use, an acquiring party's given back at "
                "its use for OIMP)"
            )
        total = sum(e.amount for e in ledger.entries)
        if total != expected.totals.get(party, 0):
            raise SimulationError(
                f"{party}: {total:+} tCO2e of adjustments in all, expected "
                f"{expected.totals.get(party, 0):+}"
            )
        if want:
            parts = expected.why.get(party, {})
            passed.append(
                f"{party}: {sum(want.values()):+} tCO2e adjusted for OIMP units at issuance or "
                "use, without a transfer ("
                + ", ".join(f"{k} {v:+}" for k, v in sorted(parts.items()))
                + ")"
            )
    # Every use: the units are in the party's NDC retirement account, and no more.
    for party, ledger in ledgers.items():
        used = sum(u[4] for u in outcome.uses if u[2] == party and u[5] == "used")
        retired = sum(h.block.quantity for h in ledger.holdings if h.account == "retired-ndc")
        if used != retired:
            raise SimulationError(
                f"{party}: {used} tCO2e used toward its NDC but {retired} in its retirement account"
            )
        if used:
            passed.append(f"{party}: {used} tCO2e used toward its NDC, all of it retired")
        used_oimp = sum(u[4] for u in outcome.uses if u[2] == party and u[5] == "used-oimp")
        in_oimp = sum(h.block.quantity for h in ledger.holdings if h.account == "retired-oimp")
        if used_oimp != in_oimp:
            raise SimulationError(
                f"{party}: {used_oimp} tCO2e used for OIMP but {in_oimp} in its OIMP "
                "retirement account"
            )
        if used_oimp:
            passed.append(f"{party}: {used_oimp} tCO2e used for OIMP, all of it retired")
        cancelled = sum(u[4] for u in outcome.uses if u[2] == party and u[5] == "cancelled")
        in_account = sum(
            h.block.quantity for h in ledger.holdings if h.account == "voluntary-cancellation"
        )
        if cancelled != in_account:
            raise SimulationError(
                f"{party}: {cancelled} tCO2e cancelled voluntarily but {in_account} in its "
                "cancellation account"
            )
        if cancelled:
            passed.append(f"{party}: {cancelled} tCO2e cancelled voluntarily, all of it cancelled")
    return passed


# -- reports --------------------------------------------------------------------------------


def _csv(rows: Iterable[Iterable[object]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerows(rows)
    return buffer.getvalue()


def _aef(
    tx: Tx, party: str, registry: str, accounting: AccountingConfig, year: int, clock: _Clock
) -> AefReport:
    """The year's AEF tables, dated in simulated time (no wall-clock date in the output)."""

    def when(micros: int) -> dt.datetime:
        date = clock.date(micros)
        return dt.datetime(date.year, date.month, date.day, tzinfo=dt.UTC)

    return build_aef(
        tx, party=party, registry=registry, year=year, accounting=accounting,
        submission_date=dt.date(year + 1, 4, 15), when=when,
    )  # fmt: skip


def _balance_csv(report: BalanceReport) -> str:
    rows: list[list[object]] = [["year", "reported_emissions", "booked_adjustment",
                                 "applied_adjustment", "adjusted_emissions", "target"]]  # fmt: skip
    for row in report.rows:
        rows.append(
            [row.year, _cell(row.reported_emissions), row.booked_adjustment,
             row.applied_adjustment, _cell(row.adjusted_emissions), _cell(row.target)]
        )  # fmt: skip
    return _csv(rows)


def _cell(value: int | None) -> str:
    return "" if value is None else str(value)


def _write_party(
    scenario: Scenario, party: Party, ledger: _Ledger, outcome: _Outcome, out: Path
) -> PartySummary:
    directory = out / party.code
    directory.mkdir(parents=True, exist_ok=True)
    entries = ledger.entries
    ca_rows: list[list[object]] = [["transfer_id", "party", "partner", "year", "amount",
                                   "unit_type", "method"]]  # fmt: skip
    for e in sorted(entries, key=lambda e: (e.transfer_id, e.year, e.amount)):
        ca_rows.append([e.transfer_id, e.party, e.partner, e.year, e.amount, e.unit_type.name,
                       e.method])  # fmt: skip
    (directory / "ca-ledger.csv").write_text(_csv(ca_rows))
    accounting = accounting_config(party)
    reported = dict(party.ndc.reported_emissions)
    report = emissions_balance(accounting, reported, entries)
    without = emissions_balance(accounting, reported, [])
    (directory / "balance.csv").write_text(_balance_csv(report))
    aef_dir = directory / "aef"
    aef_dir.mkdir(exist_ok=True)
    for aef in ledger.aef:
        write_aef(aef, aef_dir, overwrite=True)
    from itmolink.sim.charts import write_chart

    write_chart(party, report, directory)
    done = [t for t in outcome.transfers if t[7] == "completed"]

    def host_of(authorisation: str) -> str:
        return scenario.authorisation(authorisation).host

    return PartySummary(
        party=party.code,
        name=party.name,
        method=party.ndc.method,
        mitigation=sum(
            a.mitigation_per_year * len(a.years)
            for a in scenario.activities
            if a.host == party.code
        ),
        issued=sum(
            x.quantity
            for x in scenario.issuances
            if scenario.authorisation(x.authorisation).host == party.code
        ),
        transferred_out=sum(t[6] for t in done if t[3] == party.code == host_of(t[2])),
        acquired=sum(t[6] for t in done if t[4] == party.code),
        passed_on=sum(t[6] for t in done if t[3] == party.code != host_of(t[2])),
        used=sum(u[4] for u in outcome.uses if u[2] == party.code and u[5] == "used"),
        used_oimp=sum(u[4] for u in outcome.uses if u[2] == party.code and u[5] == "used-oimp"),
        cancelled=sum(u[4] for u in outcome.uses if u[2] == party.code and u[5] == "cancelled"),
        adjustments=sum(e.amount for e in entries),
        met=report.met,
        met_without_adjustments=without.met,
    )


HOST_ADJUSTS = {
    "transfer": "at the first international transfer",
    "issuance": "at issuance",
    "use": "at use for OIMP (its own or a holder's notice)",
}


def _authorisations_csv(
    scenario: Scenario, outcome: _Outcome, expected: ExpectedAdjustments
) -> str:
    """One row per authorisation: what it authorises, when the rules have its host
    adjust, what moved and was used, and the adjustments the run was checked against."""
    rows: list[list[object]] = [["authorisation", "purposes", "oimp_detail", "first_transfer",
                                 "host_adjusts", "issued", "transferred_by_host", "passed_on",
                                 "used_ndc", "used_oimp", "cancelled", "host_ca",
                                 "acquirers_ca"]]  # fmt: skip
    done = [t for t in outcome.transfers if t[7] == "completed"]
    for spec in scenario.authorisations:
        adjusts = HOST_ADJUSTS[spec.ca_point]
        if spec.both:
            adjusts += ", or at the host's own use for OIMP"

        def used(action: str, key: str = spec.id) -> int:
            return sum(u[4] for u in outcome.uses if u[1] == key and u[5] == action)

        rows.append(
            [spec.id, " ".join(spec.purposes), spec.oimp_detail, spec.first_transfer, adjusts,
             sum(x.quantity for x in scenario.issuances if x.authorisation == spec.id),
             sum(t[6] for t in done if t[2] == spec.id and t[3] == spec.host),
             sum(t[6] for t in done if t[2] == spec.id and t[3] != spec.host),
             used("used"), used("used-oimp"), used("cancelled"),
             *expected.by_authorisation[spec.id]]
        )  # fmt: skip
    return _csv(rows)


def _write_summary(out: Path, summary: Summary, outcome: _Outcome) -> None:
    header: list[object] = ["party", "name", "method", "mitigation", "issued", "transferred_out",
              "share_leaving", "acquired", "passed_on", "used", "used_oimp", "cancelled",
              "net_adjustments", "target_met", "target_met_without_ca"]  # fmt: skip
    rows: list[list[object]] = [header]
    for p in summary.parties:
        rows.append([p.party, p.name, p.method, p.mitigation, p.issued, p.transferred_out,
                     p.share_leaving, p.acquired, p.passed_on, p.used, p.used_oimp, p.cancelled,
                     p.adjustments, _verdict(p.met),
                     _verdict(p.met_without_adjustments)])  # fmt: skip
    (out / "summary.csv").write_text(_csv(rows))
    (out / "summary.txt").write_text(
        summary.table() + "".join(f"ok: {line}\n" for line in summary.invariants)
    )
    (out / "transfers.csv").write_text(
        _csv(
            [
                [
                    "year",
                    "transfer_id",
                    "authorisation",
                    "from",
                    "to",
                    "vintage",
                    "quantity",
                    "state",
                ],
                *outcome.transfers,
            ]
        )
    )
    (out / "uses.csv").write_text(
        _csv([["year", "authorisation", "party", "vintage", "quantity", "outcome"], *outcome.uses])
    )
    (out / "refusals.csv").write_text(
        _csv(
            [
                ["year", "authorisation", "from", "to", "vintage", "quantity", "reason"],
                *outcome.refusals,
            ]
        )
    )


def _prepare(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="nodes-", dir=out))


async def run_scenario_async(
    scenario: Scenario,
    out_dir: Path,
    *,
    seed: int = 0,
    progress: Progress | None = None,
    keep_nodes: bool = False,
) -> Summary:
    """:func:`run_scenario` inside a running event loop."""
    out = Path(out_dir)
    root = await asyncio.to_thread(_prepare, out)
    net = _Network(scenario, root)
    clock = _Clock()
    try:
        try:
            await net.start()
            outcome = await _play(scenario, net, clock, seed, progress)
        finally:
            await net.stop()
        transfer_ids = [t[1] for t in outcome.transfers]
        ledgers = {}
        for party in scenario.parties:
            ledgers[party.code] = await asyncio.to_thread(
                _collect, net.nodes[party.code], accounting_config(party), scenario.years,
                clock, transfer_ids,
            )  # fmt: skip
        passed = _check_invariants(scenario, ledgers, outcome)
        (out / "authorisations.csv").write_text(
            _authorisations_csv(scenario, outcome, expected_adjustments(scenario, outcome))
        )
        parties = tuple(
            _write_party(scenario, party, ledgers[party.code], outcome, out)
            for party in scenario.parties
        )
    finally:
        if not keep_nodes:
            shutil.rmtree(root, ignore_errors=True)
    summary = Summary(
        scenario=scenario.name,
        seed=seed,
        out_dir=out,
        parties=parties,
        transfers_completed=sum(1 for t in outcome.transfers if t[7] == "completed"),
        transfers_refused=len(outcome.refusals),
        invariants=tuple(passed),
    )
    _write_summary(out, summary, outcome)
    return summary


def run_scenario(
    scenario: Scenario,
    out_dir: Path,
    *,
    seed: int = 0,
    progress: Progress | None = None,
    keep_nodes: bool = False,
) -> Summary:
    """Run ``scenario`` through real nodes and write its tables (and charts) to ``out_dir``."""
    return asyncio.run(
        run_scenario_async(scenario, out_dir, seed=seed, progress=progress, keep_nodes=keep_nodes)
    )
