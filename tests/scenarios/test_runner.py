"""lao-korea.toml end to end through real nodes; the numbers behind the charts."""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from pathlib import Path

import pytest

from itmolink.admin.v1 import admin_pb2
from itmolink.core.accounting import emissions_balance
from itmolink.sim import runner
from itmolink.sim.runner import accounting_config, run_scenario
from itmolink.sim.scenario import Issuance, Transfer, Use, load_scenario

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "lao-korea.toml"


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def tables(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*.csv"))}


def test_lao_korea_end_to_end(tmp_path: Path) -> None:
    scenario = load_scenario(EXAMPLE)
    summary = run_scenario(scenario, tmp_path / "a", seed=3)
    out = tmp_path / "a"

    # Every scheduled transfer completed; the total is the schedule's.
    scheduled = sum(t.quantity for t in scenario.transfers)
    transfers = read(out / "transfers.csv")
    assert len(transfers) == len(scenario.transfers)
    assert all(t["state"] == "completed" for t in transfers)
    lao = next(p for p in summary.parties if p.party == "LAO")
    kor = next(p for p in summary.parties if p.party == "KOR")
    assert lao.transferred_out == kor.acquired == scheduled
    assert lao.mitigation == 10 * (100_000 + 84_000 + 30_000 + 29_000)  # Table 11.1

    # Host CA per year = transfers per vintage; the buyer's is opposite.
    per_vintage: dict[int, int] = defaultdict(int)
    for t in scenario.transfers:
        per_vintage[t.vintage] += t.quantity
    lao_balance = {int(r["year"]): r for r in read(out / "LAO" / "balance.csv")}
    kor_balance = {int(r["year"]): r for r in read(out / "KOR" / "balance.csv")}
    for year in scenario.years:
        assert int(lao_balance[year]["booked_adjustment"]) == per_vintage[year]
        assert int(kor_balance[year]["booked_adjustment"]) == -per_vintage[year]
        reported = scenario.party("LAO").ndc.reported_emissions[year]
        assert int(lao_balance[year]["reported_emissions"]) == reported
    # Averaging: the period's total over ten years (rounded up) lands on 2030.
    assert int(lao_balance[2030]["applied_adjustment"]) == -(-scheduled // 10)
    assert int(lao_balance[2030]["target"]) == 62_000_000

    # The ledger agrees, transfer by transfer.
    lao_ledger = read(out / "LAO" / "ca-ledger.csv")
    kor_ledger = {r["transfer_id"]: int(r["amount"]) for r in read(out / "KOR" / "ca-ledger.csv")}
    assert sum(int(r["amount"]) for r in lao_ledger) == scheduled
    assert all(kor_ledger[r["transfer_id"]] == -int(r["amount"]) for r in lao_ledger)

    # The verdict is the core's.
    party = scenario.party("LAO")
    entries_total = sum(per_vintage.values())
    assert entries_total == scheduled
    without = emissions_balance(accounting_config(party), party.ndc.reported_emissions, [])
    assert lao.met_without_adjustments == without.met
    assert (out / "LAO" / "aef" / "2025-actions.csv").exists()

    # Korea's uses toward its NDC: each one applied, retired, and in its AEF Actions table.
    uses = read(out / "uses.csv")
    assert len(uses) == len(scenario.uses) > 0
    assert all(u["outcome"] == "used" for u in uses)
    assert kor.used == sum(u.quantity for u in scenario.uses)
    assert lao.used == 0
    actions = read(out / "KOR" / "aef" / "2025-actions.csv")
    used_2025 = [a for a in actions if a["Action type"] == "Use"]
    assert sum(int(a["Quantity (t CO2 eq)"]) for a in used_2025) == sum(
        u.quantity for u in scenario.uses if u.year == 2025
    )
    assert {a["Calendar year for which the ITMOs are used towards the Party's NDC"]
            for a in used_2025} == {"2025"}  # fmt: skip
    assert any("conservation LAO-NR" in line for line in summary.invariants)

    # Deterministic: the same file and seed give the same tables, byte for byte.
    run_scenario(scenario, tmp_path / "b", seed=3)
    assert tables(out) == tables(tmp_path / "b")


def test_nodes_are_processes_stopped_even_when_the_run_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, runner._NodeProcess] = {}

    async def fail(scenario: object, net: runner._Network, *args: object) -> None:
        seen.update(net.nodes)
        for node in net.nodes.values():  # each answers on its own admin port, in its process
            assert node.process is not None
            assert node.process.poll() is None
            info = await node.admin.GetNodeInfo(
                admin_pb2.GetNodeInfoRequest(), metadata=node.metadata, timeout=5
            )
            assert info.party == node.party
        raise runner.SimulationError("stop here")

    monkeypatch.setattr(runner, "_play", fail)
    with pytest.raises(runner.SimulationError, match="stop here"):
        run_scenario(load_scenario(EXAMPLE), tmp_path / "out", keep_nodes=True)
    assert sorted(seen) == ["KOR", "LAO"]
    for node in seen.values():
        assert node.process is not None
        assert node.process.returncode == 0  # SIGTERM, a clean shutdown
    config = (next(iter(seen.values())).config).read_text()
    assert "127.0.0.1:0" not in config


ONWARD = EXAMPLE.parent / "lao-korea-japan-onward.toml"


def test_onward_transfers_end_to_end(tmp_path: Path) -> None:
    """Korea passes on part of what it acquires from Lao PDR to Japan, which never
    deals with Lao PDR's registry for these units."""
    scenario = load_scenario(ONWARD)
    summary = run_scenario(scenario, tmp_path, seed=5)
    transfers = read(tmp_path / "transfers.csv")
    assert len(transfers) == len(scenario.transfers)
    assert all(t["state"] == "completed" for t in transfers)
    first = sum(t.quantity for t in scenario.transfers if not scenario.onward(t))
    onward = sum(t.quantity for t in scenario.transfers if scenario.onward(t))
    assert onward > 0
    parties = {p.party: p for p in summary.parties}
    assert parties["LAO"].transferred_out == parties["KOR"].acquired == first
    assert parties["KOR"].passed_on == parties["JPN"].acquired == onward
    assert parties["KOR"].transferred_out == parties["LAO"].passed_on == 0
    assert parties["JPN"].used == sum(u.quantity for u in scenario.uses if u.party == "JPN")
    cancellations = [u for u in scenario.uses if u.action == "voluntary-cancellation"]
    assert cancellations
    assert parties["KOR"].cancelled == sum(u.quantity for u in cancellations)
    assert parties["KOR"].used == sum(
        u.quantity for u in scenario.uses if u.party == "KOR" and u.action == "use-ndc"
    )
    outcomes = [u["outcome"] for u in read(tmp_path / "uses.csv")]
    assert outcomes.count("cancelled") == len(cancellations)
    assert set(outcomes) == {"used", "cancelled"}

    # Corresponding adjustments: the host adds only what it first transferred; Korea
    # subtracts what it acquired and adds back what it passed on; Japan subtracts that.
    def ledger(party: str) -> dict[str, int]:
        rows = read(tmp_path / party / "ca-ledger.csv")
        return {r["transfer_id"]: int(r["amount"]) for r in rows}

    lao, kor, jpn = ledger("LAO"), ledger("KOR"), ledger("JPN")
    assert sum(lao.values()) == first
    assert sum(kor.values()) == onward - first
    assert sum(jpn.values()) == -onward
    assert set(jpn) <= set(kor)
    assert all(kor[t] == -amount > 0 for t, amount in jpn.items())
    assert parties["KOR"].adjustments == onward - first

    # Japan's AEF actions name Lao PDR as first transferring party and Korea as the
    # transferring one.
    actions = read(tmp_path / "JPN" / "aef" / "2025-actions.csv")
    acquisitions = [a for a in actions if a["Action type"] == "Acquisition"]
    assert acquisitions
    assert {a["First transferring participating Party ID"] for a in acquisitions} == {"LAO"}
    assert {a["Transferring participating Party ID"] for a in acquisitions} == {"KOR"}
    assert any("conservation LAO-NR" in line for line in summary.invariants)
    kor_actions = read(tmp_path / "KOR" / "aef" / "2026-actions.csv")
    assert [int(a["Quantity (t CO2 eq)"]) for a in kor_actions
            if a["Action type"] == "Voluntary Cancellation"] == [5_000]  # fmt: skip
    assert any("KOR: 25000 tCO2e cancelled voluntarily" in line for line in summary.invariants)


def test_oimp_units_end_to_end(tmp_path: Path) -> None:
    """OIMP units (CORSIA) beside NDC units: they move without adjustments; the host
    books its adjustment at issuance or, on Korea's first-transfer notices, at use."""
    scenario = load_scenario(EXAMPLE.parent / "lao-korea-oimp.toml")
    summary = run_scenario(scenario, tmp_path, seed=3)
    transfers = read(tmp_path / "transfers.csv")
    assert len(transfers) == len(scenario.transfers)
    assert all(t["state"] == "completed" for t in transfers)

    def quantity(*, oimp: bool, point: str = "", party: str = "", action: str = "") -> int:
        total = 0
        items: list[Issuance | Transfer | Use] = [
            *scenario.issuances,
            *scenario.transfers,
            *scenario.uses,
        ]
        for item in items:
            spec = scenario.authorisation(item.authorisation)
            if spec.oimp_only != oimp or (point and spec.ca_point != point):
                continue
            if action and getattr(item, "action", None) != action:
                continue
            if party and getattr(item, "party", None) != party:
                continue
            total += item.quantity
        return total

    ndc_moved = sum(t.quantity for t in scenario.transfers if not scenario.authorisation(
        t.authorisation).oimp_only)  # fmt: skip
    at_issuance = sum(
        x.quantity for x in scenario.issuances
        if scenario.authorisation(x.authorisation).ca_point == "issuance"
    )  # fmt: skip
    at_use = sum(
        u.quantity for u in scenario.uses
        if u.action == "use-oimp" and scenario.authorisation(u.authorisation).ca_point == "use"
    )  # fmt: skip
    assert ndc_moved > 0
    assert at_issuance > 0
    assert at_use > 0
    parties = {p.party: p for p in summary.parties}
    assert parties["LAO"].adjustments == ndc_moved + at_issuance + at_use
    assert parties["KOR"].adjustments == -ndc_moved  # nothing for OIMP units
    assert parties["KOR"].used_oimp == quantity(oimp=True, party="KOR", action="use-oimp")
    assert parties["LAO"].used_oimp == quantity(oimp=True, party="LAO", action="use-oimp") > 0

    def ledger(party: str) -> list[dict[str, str]]:
        return read(tmp_path / party / "ca-ledger.csv")

    transfer_ids = {t["transfer_id"] for t in transfers}
    oimp_ids = {
        t["transfer_id"] for t in transfers if scenario.authorisation(t["authorisation"]).oimp_only
    }
    for party in ("LAO", "KOR"):
        assert not {r["transfer_id"] for r in ledger(party)} & oimp_ids
    notices = [r for r in ledger("LAO") if r["transfer_id"] not in transfer_ids and r["partner"]]
    assert {r["partner"] for r in notices} == {"KOR"}
    assert sum(int(r["amount"]) for r in notices) == quantity(
        oimp=True, point="use", party="KOR", action="use-oimp"
    )
    assert any("tCO2e adjusted for OIMP units at issuance or use" in s for s in summary.invariants)
    outcomes = {u["outcome"] for u in read(tmp_path / "uses.csv")}
    assert outcomes == {"used", "used-oimp"}


BOTH = EXAMPLE.parent / "lao-japan-ndc-oimp.toml"


def test_units_for_ndc_and_oimp_end_to_end(tmp_path: Path) -> None:
    """Units authorised for both NDC and OIMP are adjusted, equal and opposite, at the
    host's transfer (the buyer's share at issuance included), whatever their OIMP
    first-transfer definition, at the host's own OIMP use of units it kept, whatever
    that definition, and given back at an acquiring party's OIMP use (decision 59);
    OIMP-only shares of issuance move without an adjustment."""
    scenario = load_scenario(BOTH)
    summary = run_scenario(scenario, tmp_path, seed=2)
    transfers = read(tmp_path / "transfers.csv")
    shares = [x for x in scenario.issuances if scenario.buyer_share(x)]
    assert len(transfers) == len(scenario.transfers) + len(shares)
    assert all(t["state"] == "completed" for t in transfers)
    assert {u["outcome"] for u in read(tmp_path / "uses.csv")} == {"used", "used-oimp"}

    # The expectation, worked out from the file: what each authorisation's units book.
    specs = {s.id: s for s in scenario.authorisations}
    assert specs["solar-both"].both
    assert specs["solar-both"].first_transfer == "issuance"
    assert specs["ev-both"].first_transfer == "use"
    both_moved: dict[int, int] = defaultdict(int)  # vintage -> tCO2e LAO -> JPN
    for x in shares:
        if specs[x.authorisation].both:
            both_moved[x.vintage] += scenario.buyer_share(x)
    for planned in scenario.transfers:
        assert specs[planned.authorisation].both
        both_moved[planned.vintage] += planned.quantity
    own_use = sum(u.quantity for u in scenario.uses if u.party == "LAO")
    assert own_use == 27_000
    own_by_key = {
        k: sum(u.quantity for u in scenario.uses if u.party == "LAO" and u.authorisation == k)
        for k in ("solar-both", "ev-both")
    }
    assert own_by_key == {"solar-both": 12_000, "ev-both": 15_000}
    given_back_by_vintage: dict[int, int] = defaultdict(int)
    for u in scenario.uses:
        if u.party == "JPN" and specs[u.authorisation].both and u.action == "use-oimp":
            given_back_by_vintage[u.vintage] += u.quantity
    given_back = sum(given_back_by_vintage.values())
    assert given_back == 9_000
    at_issuance = sum(
        x.quantity for x in scenario.issuances if x.authorisation == "biofuels-corsia"
    )
    noticed = sum(u.quantity for u in scenario.uses if u.authorisation == "biomass-corsia")
    assert min(sum(both_moved.values()), at_issuance, noticed) > 0

    parties = {p.party: p for p in summary.parties}
    assert parties["LAO"].adjustments == sum(both_moved.values()) + own_use + at_issuance + noticed
    assert parties["JPN"].adjustments == -sum(both_moved.values()) + given_back
    assert parties["JPN"].used == sum(
        u.quantity
        for u in scenario.uses
        if specs[u.authorisation].both and u.party == "JPN" and u.action == "use-ndc"
    )
    assert parties["LAO"].used_oimp == own_use

    # Transfer by transfer: +quantity at LAO and -quantity at JPN for units for both
    # purposes, for the vintage; nothing for OIMP-only units.
    lao = read(tmp_path / "LAO" / "ca-ledger.csv")
    jpn = read(tmp_path / "JPN" / "ca-ledger.csv")
    transfer_ids = {t["transfer_id"] for t in transfers}
    lao_by_transfer = {r["transfer_id"]: (int(r["year"]), int(r["amount"])) for r in lao}
    jpn_moved = [r for r in jpn if r["transfer_id"] in transfer_ids]
    jpn_by_transfer = {r["transfer_id"]: (int(r["year"]), int(r["amount"])) for r in jpn_moved}
    assert len(jpn_by_transfer) == len(jpn_moved)
    booked: dict[int, int] = defaultdict(int)
    for t in transfers:
        if specs[t["authorisation"]].both:
            vintage, quantity = int(t["vintage"]), int(t["quantity"])
            assert lao_by_transfer[t["transfer_id"]] == (vintage, quantity)
            assert jpn_by_transfer[t["transfer_id"]] == (vintage, -quantity)
            booked[vintage] += quantity
        else:
            assert t["transfer_id"] not in lao_by_transfer
            assert t["transfer_id"] not in jpn_by_transfer
    assert booked == both_moved
    # Without a transfer, at LAO: the biofuels at issuance, its own EV and solar use,
    # and Japan's notices of its biomass use; at JPN: what it gave back at its CORSIA use
    # of solar units, for their vintage.
    others = [r for r in lao if r["transfer_id"] not in transfer_ids]
    assert sum(int(r["amount"]) for r in others) == at_issuance + own_use + noticed
    assert sum(int(r["amount"]) for r in others if r["partner"] == "JPN") == noticed
    jpn_others: dict[int, int] = defaultdict(int)
    for r in jpn:
        if r["transfer_id"] not in transfer_ids:
            jpn_others[int(r["year"])] += int(r["amount"])
    assert jpn_others == given_back_by_vintage

    # Japan's NDC balance carries its subtractions by vintage; nothing in 2029 or 2030.
    balance = {
        int(r["year"]): int(r["booked_adjustment"]) for r in read(tmp_path / "JPN" / "balance.csv")
    }
    assert {y: a for y, a in balance.items() if a} == {
        y: given_back_by_vintage[y] - q for y, q in both_moved.items()
    }
    # The report per authorisation states the rule and the adjustments checked.
    report = {r["authorisation"]: r for r in read(tmp_path / "authorisations.csv")}
    assert report["solar-both"]["purposes"] == "NDC OIMP"
    for key in ("solar-both", "ev-both"):
        assert report[key]["host_adjusts"] == (
            "at the first international transfer, or at the host's own use for OIMP"
        )
    moved = {k: sum(t.quantity for t in scenario.transfers if t.authorisation == k)
             for k in ("solar-both", "ev-both")}  # fmt: skip
    solar_shares = sum(scenario.buyer_share(x) for x in shares if x.authorisation == "solar-both")
    expected_ca = {
        "solar-both": (
            moved["solar-both"] + solar_shares + own_by_key["solar-both"],
            -moved["solar-both"] - solar_shares + given_back,
        ),
        "ev-both": (moved["ev-both"] + own_by_key["ev-both"], -moved["ev-both"]),
        "biomass-corsia": (noticed, 0),
        "biofuels-corsia": (at_issuance, 0),
    }
    assert {k: (int(r["host_ca"]), int(r["acquirers_ca"])) for k, r in report.items()} == (
        expected_ca
    )
    summary_text = (tmp_path / "summary.txt").read_text()
    assert "(9 of units for NDC and OIMP, booked at the transfer)" in summary_text
    assert "at its own use +27000" in summary_text
    assert "given back at its use for OIMP +9000" in summary_text


# Loaded by every node process of the next test (through PYTHONPATH), each a wrong
# booking of units authorised for both NDC and OIMP.
WRONG_BOOKINGS = {
    # The node takes the OIMP first-transfer definition "at issuance" as the first
    # transfer also of units authorised for NDC: the host books them at issuance and
    # not at their transfer.
    "at-issuance": """
from itmolink.core.units import FirstTransferDefinition, Purpose
from itmolink.node.base import EngineBase

_ca_point = EngineBase._ca_point


def _wrong(authorisation):
    if (
        Purpose.NDC in authorisation.terms.purposes
        and authorisation.first_transfer_definition is FirstTransferDefinition.AT_ISSUANCE
    ):
        return "issuance"
    return _ca_point(authorisation)


EngineBase._ca_point = staticmethod(_wrong)
""",
    # The host's own use for OIMP of units it never transferred books nothing.
    "own-use-unbooked": """
from itmolink.node.base import EngineBase

_book = EngineBase._book_first_transfer


def _wrong(self, tx, blocks, *, reference, subtype, now_us):
    if not reference.startswith("use:"):
        _book(self, tx, blocks, reference=reference, subtype=subtype, now_us=now_us)


EngineBase._book_first_transfer = _wrong
""",
}
CAUGHT = {
    # The first buyer's share of solar-both: JPN subtracted it, LAO booked it at issuance.
    "at-issuance": r"LAO-T-\d+ \(completed, 30000 tCO2e of 2026 of solar-both, NDC and OIMP\): "
    r"adjustments \[\] at LAO and \[\(2026, -30000\)\] at JPN, "
    r"expected \[\(2026, 30000\)\] and \[\(2026, -30000\)\]",
    # 20,000 of biofuels at issuance and 30,000 on Japan's notices, not LAO's 5,000 of EV
    # and 4,000 of solar.
    "own-use-unbooked": r"LAO: adjustments without a transfer \{2026: 50000, 2027: 50000, "
    r"2028: 50000\} by vintage, expected \{2026: 59000, 2027: 59000, 2028: 59000\}",
}


@pytest.mark.parametrize("wrong", sorted(WRONG_BOOKINGS))
def test_a_node_booking_units_for_both_purposes_wrongly_fails_the_run(
    wrong: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    patch = tmp_path / "patch"
    patch.mkdir()
    (patch / "sitecustomize.py").write_text(WRONG_BOOKINGS[wrong])
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(patch), os.environ.get("PYTHONPATH")]))
    )
    with pytest.raises(runner.SimulationError) as caught:
        run_scenario(load_scenario(BOTH), tmp_path / "out", seed=2)
    assert re.search(CAUGHT[wrong], str(caught.value)), caught.value
