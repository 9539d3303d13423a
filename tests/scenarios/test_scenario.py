"""The scenario schema: the examples parse, and bad files name the offending field."""

from __future__ import annotations

from pathlib import Path

import pytest

from itmolink.sim.scenario import ScenarioError, load_scenario, parse_scenario

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

GOOD = """
[scenario]
name = "t"
[[parties]]
code = "LAO"
[parties.ndc]
method = "averaging"
target_year = 2030
target_emissions = 62000000
reported_emissions = [64000000, 61000000]
[[parties]]
code = "KOR"
[parties.ndc]
method = "multi-year-budget"
target_emissions = 5000000000
reported_emissions = [500000000, 440000000]
[[activities]]
id = "LAO-SOLAR"
host = "LAO"
mitigation_per_year = 100000
[[authorisations]]
id = "solar"
activity = "LAO-SOLAR"
cooperative_approach = "LAO-KOR-A6.2"
acquiring = ["KOR"]
[[issuances]]
authorisation = "solar"
years = [2021, 2030]
[[transfers]]
authorisation = "solar"
to = "KOR"
years = [2022, 2030]
quantity = 60000
vintage_offset = -1
[[uses]]
party = "KOR"
authorisation = "solar"
years = [2023, 2030]
quantity = 50000
vintage_offset = -2
"""


def test_good_scenario_expands_the_schedule() -> None:
    scenario = parse_scenario(GOOD, "good.toml")
    assert len(scenario.issuances) == 10
    assert [t.vintage for t in scenario.transfers] == list(range(2021, 2030))
    assert scenario.party("LAO").ndc.reported_emissions[2021] == 64000000
    assert scenario.party("LAO").ndc.reported_emissions[2030] == 61000000
    assert scenario.links() == [("LAO", "KOR")]
    assert [(u.year, u.vintage, u.party) for u in scenario.uses][:2] == [
        (2023, 2021, "KOR"), (2024, 2022, "KOR")
    ]  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [
        "lao-korea.toml",
        "lao-japan-jcm.toml",
        "asean-network.toml",
        "lao-korea-japan-onward.toml",
        "lao-korea-oimp.toml",
    ],
)
def test_examples_parse(name: str) -> None:
    scenario = load_scenario(EXAMPLES / name)
    assert scenario.first_year == 2021
    assert scenario.last_year == 2030


def test_examples_carry_the_chapter_figures() -> None:
    lao = load_scenario(EXAMPLES / "lao-korea.toml")
    figures = {a.id: a.mitigation_per_year for a in lao.activities}
    assert figures["LAO-SOLAR-WIND-1GW"] == 100_000
    assert figures["LAO-BIOMASS-300MW"] == 84_000
    jcm = load_scenario(EXAMPLES / "lao-japan-jcm.toml")
    assert jcm.activities[0].mitigation_per_year == 19_751
    assert jcm.authorisations[0].buyer_share_bp == 8000
    asean = load_scenario(EXAMPLES / "asean-network.toml")
    assert len(asean.parties) >= 10


def test_the_ndc_and_oimp_example_is_short_and_has_each_kind_of_authorisation() -> None:
    scenario = load_scenario(EXAMPLES / "lao-japan-ndc-oimp.toml")
    assert len(scenario.years) == 3  # run end to end in CI (tests/scenarios/test_runner.py)
    kinds = {
        (a.purposes, a.first_transfer, a.buyer_share_bp) for a in scenario.authorisations
    }  # fmt: skip
    assert kinds == {
        (("NDC", "OIMP"), "issuance", 5000),
        (("NDC", "OIMP"), "use", 0),
        (("OIMP",), "use", 8000),
        (("OIMP",), "issuance", 8000),
    }
    figures = {a.id: a.mitigation_per_year for a in scenario.activities}
    assert figures == {
        "LAO-SOLAR-WIND-1GW": 100_000, "LAO-EV-30PCT": 30_000,
        "LAO-BIOMASS-300MW": 84_000, "LAO-BIOFUELS-10PCT": 29_000,
    }  # fmt: skip
    assert {(u.party, u.action) for u in scenario.uses} == {
        ("JPN", "use-ndc"), ("JPN", "use-oimp"), ("LAO", "use-oimp"),
    }  # fmt: skip


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ('method = "averaging"', 'method = "cumulative"', "parties[0].ndc.method: must be one of"),
        ('code = "KOR"', 'code = "Korea"', "parties[1].code:"),
        ("mitigation_per_year = 100000", "mitigation_per_year = -5",
         "activities[0].mitigation_per_year: must be at least 1"),
        ('acquiring = ["KOR"]', 'acquiring = ["JPN"]', "authorisations[0].acquiring[0]:"),
        ("years = [2022, 2030]", "years = [2022, 2040]", "transfers[0].years:"),
        ("quantity = 60000", "quantity = 160000", "transfers[0].quantity:"),
        ("vintage_offset = -1", "vintage_offset = 0\ncolour = 1", "transfers[0].colour: unknown"),
        ("reported_emissions = [64000000, 61000000]", "reported_emissions = { 2021 = 1 }",
         "parties[0].ndc.reported_emissions: no value for 2022"),
        ('to = "KOR"', 'to = "LAO"', "transfers[0].to:"),
        ('party = "KOR"', 'party = "LAO"', "uses[0].party: LAO is not an acquiring party"),
        ("quantity = 50000", "quantity = 60001", "uses[0].quantity: by 2023 KOR would use 60001"),
        ("vintage_offset = -2", "vintage_offset = 0", "uses[0].quantity: by 2023 KOR would use"),
        ("years = [2023, 2030]", "years = [2023, 2031]", "uses[0].years:"),
    ],
)  # fmt: skip
def test_bad_files_name_the_field(old: str, new: str, field: str) -> None:
    assert old in GOOD
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(GOOD.replace(old, new, 1), "examples/x.toml")
    assert str(caught.value).startswith("examples/x.toml: ")
    assert field in str(caught.value)


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="not valid TOML"):
        parse_scenario("[scenario", "bad.toml")
    with pytest.raises(ScenarioError, match="no such scenario file"):
        load_scenario(tmp_path / "missing.toml")


JPN = """[[parties]]
code = "JPN"
[parties.ndc]
method = "averaging"
target_year = 2030
target_emissions = 760000000
reported_emissions = [1150000000, 760000000]
"""
ONWARD_TRANSFER = """[[transfers]]
authorisation = "solar"
from = "KOR"
to = "JPN"
years = [2022, 2030]
quantity = 10000
vintage_offset = -1
"""
ONWARD = (
    GOOD.replace('acquiring = ["KOR"]', 'acquiring = ["KOR", "JPN"]')
    .replace("[[activities]]", JPN + "[[activities]]")
    .replace("[[uses]]", ONWARD_TRANSFER + "[[uses]]")
)


def test_onward_transfers_are_scheduled_from_the_acquiring_party() -> None:
    scenario = parse_scenario(ONWARD)
    onward = [t for t in scenario.transfers if scenario.onward(t)]
    assert [(t.year, t.from_party, t.to_party, t.vintage) for t in onward][:2] == [
        (2022, "KOR", "JPN", 2021), (2023, "KOR", "JPN", 2022)
    ]  # fmt: skip
    assert len(onward) == 9
    assert not any(scenario.onward(t) for t in scenario.transfers if t.from_party == "LAO")
    # LAO links to both acquiring parties; KOR and JPN link for the onward transfers.
    assert scenario.links() == [("KOR", "JPN"), ("LAO", "JPN"), ("LAO", "KOR")]


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        # Units arriving in a year may move on in that year: 60,000 in, 10,000 + 50,000 out.
        ("quantity = 10000", "quantity = 10001",
         "uses[0].quantity: by 2023 KOR would use 50000 tCO2e of vintage 2021 of solar but "
         "holds only 49999"),
        # ...but not more than arrived, whatever the order within the year.
        ("quantity = 10000", "quantity = 60001",
         "transfers[1].quantity: by 2022 KOR would transfer 60001 tCO2e of vintage 2021 of "
         "solar but holds only 60000"),
        ('from = "KOR"', 'from = "THA"', "transfers[1].from: THA is neither the host nor"),
        ('from = "KOR"', 'from = "JPN"', "transfers[1].from: JPN cannot transfer to itself"),
        ('to = "JPN"', 'to = "LAO"', "transfers[1].to: LAO is not an acquiring party"),
        ('party = "KOR"\nauthorisation = "solar"\nyears = [2023, 2030]',
         'party = "KOR"\nauthorisation = "solar"\naction = "retire"\nyears = [2023, 2030]',
         "uses[0].action: must be one of use-ndc, use-oimp, voluntary-cancellation"),
        # A host may cancel its own units voluntarily, but not use them as a buyer would.
        ('party = "KOR"\nauthorisation = "solar"\nyears = [2023, 2030]',
         'party = "LAO"\nauthorisation = "solar"\nyears = [2023, 2030]',
         "uses[0].party: LAO is not an acquiring party"),
    ],
)  # fmt: skip
def test_bad_onward_transfers_name_the_field(old: str, new: str, field: str) -> None:
    assert old in ONWARD
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(ONWARD.replace(old, new, 1), "examples/x.toml")
    assert field in str(caught.value)


def test_a_host_or_a_buyer_cancels_voluntarily() -> None:
    cancel = ONWARD.replace(
        'party = "KOR"\nauthorisation = "solar"\nyears = [2023, 2030]',
        'party = "LAO"\nauthorisation = "solar"\naction = "voluntary-cancellation"\n'
        "years = [2023, 2030]",
    )
    # The host holds 40,000 of each vintage after its first transfers.
    scenario = parse_scenario(cancel.replace("quantity = 50000", "quantity = 40000"))
    assert {(u.party, u.action) for u in scenario.uses} == {("LAO", "voluntary-cancellation")}
    with pytest.raises(ScenarioError, match=r"uses\[0\].quantity: by 2023 LAO would cancel"):
        parse_scenario(cancel.replace("quantity = 50000", "quantity = 40001"))


OIMP = 'acquiring = ["KOR"]\npurposes = ["OIMP"]\nfirst_transfer = "use"'


def test_oimp_units_default_to_use_for_oimp_and_book_at_their_first_transfer_point() -> None:
    scenario = parse_scenario(GOOD.replace('acquiring = ["KOR"]', OIMP, 1))
    spec = scenario.authorisation("solar")
    assert (spec.purposes, spec.oimp_detail, spec.first_transfer) == (("OIMP",), "CORSIA", "use")
    assert spec.ca_point == "use"
    assert {u.action for u in scenario.uses} == {"use-oimp"}
    issuance = GOOD.replace('acquiring = ["KOR"]', OIMP.replace('"use"', '"authorisation"'), 1)
    assert parse_scenario(issuance).authorisation("solar").ca_point == "issuance"
    assert parse_scenario(GOOD).authorisation("solar").ca_point == "transfer"


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ('acquiring = ["KOR"]', 'acquiring = ["KOR"]\npurposes = ["NDC", "NDC"]',
         'authorisations[0].purposes: must be ["NDC"], ["OIMP"] or ["NDC", "OIMP"]'),
        ('acquiring = ["KOR"]', 'acquiring = ["KOR"]\npurposes = ["CORSIA"]',
         'authorisations[0].purposes: must be ["NDC"], ["OIMP"] or ["NDC", "OIMP"]'),
        ('acquiring = ["KOR"]', 'acquiring = ["KOR"]\npurposes = ["NDC", "OIMP"]',
         "authorisations[0].first_transfer: missing"),
        ('acquiring = ["KOR"]', 'acquiring = ["KOR"]\npurposes = ["OIMP"]',
         "authorisations[0].first_transfer: missing"),
        ('acquiring = ["KOR"]', OIMP.replace('"use"', '"transfer"'),
         "authorisations[0].first_transfer: must be one of authorisation, issuance, use"),
        ('acquiring = ["KOR"]', 'acquiring = ["KOR"]\nfirst_transfer = "use"',
         "authorisations[0].first_transfer: only for units authorised for OIMP"),
        ("vintage_offset = -2", 'vintage_offset = -2\naction = "use-oimp"',
         "uses[0].action: solar authorises its units for NDC use only"),
    ],
)  # fmt: skip
def test_bad_oimp_authorisations_and_uses_name_the_field(old: str, new: str, field: str) -> None:
    with pytest.raises(ScenarioError) as caught:
        parse_scenario(GOOD.replace(old, new, 1), "examples/x.toml")
    assert field in str(caught.value)


def test_an_oimp_use_toward_an_ndc_is_refused() -> None:
    text = GOOD.replace('acquiring = ["KOR"]', OIMP, 1).replace(
        "vintage_offset = -2", 'vintage_offset = -2\naction = "use-ndc"'
    )
    with pytest.raises(
        ScenarioError, match=r"uses\[0\]\.action: solar authorises its units for OIMP"
    ):
        parse_scenario(text)


BOTH = 'acquiring = ["KOR"]\npurposes = ["OIMP", "NDC"]\nfirst_transfer = "issuance"'


def test_units_for_both_purposes_are_adjusted_at_the_transfer_and_used_toward_the_ndc() -> None:
    scenario = parse_scenario(GOOD.replace('acquiring = ["KOR"]', BOTH, 1))
    spec = scenario.authorisation("solar")
    assert (spec.purposes, spec.oimp_detail, spec.first_transfer) == (
        ("NDC", "OIMP"), "CORSIA", "issuance",
    )  # fmt: skip
    assert spec.both
    assert spec.ndc
    assert spec.for_oimp
    assert not spec.oimp_only
    assert spec.ca_point == "transfer"  # whatever the OIMP definition
    assert spec.host_books_own_oimp_use  # of units it kept, whatever the definition
    assert {(u.party, u.action) for u in scenario.uses} == {("KOR", "use-ndc")}
    at_use = parse_scenario(GOOD.replace('acquiring = ["KOR"]', BOTH.replace("issuance", "use"), 1))
    assert at_use.authorisation("solar").ca_point == "transfer"
    assert at_use.authorisation("solar").host_books_own_oimp_use


# The host keeps 40,000 of each vintage after its first transfers (GOOD).
HOST_OIMP_USE = (
    'party = "LAO"\nauthorisation = "solar"\naction = "use-oimp"\nyears = [2023, 2030]\n'
    "quantity = 30000"
)


def test_units_for_both_purposes_may_be_used_for_oimp_by_the_host_and_the_acquiring_party() -> None:
    """decision 59: the host's own use for OIMP of units it kept is their first transfer
    under any OIMP definition, and an acquiring party gives back at its use for OIMP
    what it subtracted at acquisition; the runner expects both bookings."""
    base = GOOD.replace('acquiring = ["KOR"]', BOTH, 1)
    host_use = base.replace('party = "KOR"\nauthorisation = "solar"\nyears = [2023, 2030]\n'
                            "quantity = 50000", HOST_OIMP_USE)  # fmt: skip
    assert host_use != base
    for point in ("issuance", "authorisation", "use"):
        uses = parse_scenario(host_use.replace('first_transfer = "issuance"',
                                               f'first_transfer = "{point}"')).uses  # fmt: skip
        assert {(u.party, u.action, u.quantity) for u in uses} == {("LAO", "use-oimp", 30000)}
    acquirer = parse_scenario(
        base.replace("vintage_offset = -2", 'vintage_offset = -2\naction = "use-oimp"')
    )
    assert {(u.party, u.action) for u in acquirer.uses} == {("KOR", "use-oimp")}
    # A voluntary cancellation of such units stays open to the acquiring party.
    cancelled = base.replace(
        "vintage_offset = -2", 'vintage_offset = -2\naction = "voluntary-cancellation"'
    )
    assert {u.action for u in parse_scenario(cancelled).uses} == {"voluntary-cancellation"}


def test_a_buyers_share_of_oimp_units_is_held_by_the_buyer_from_issuance() -> None:
    shared = GOOD.replace('acquiring = ["KOR"]', OIMP + "\nbuyer_share_bp = 6000", 1)
    # 60% of 100,000 reaches KOR at issuance: with no transfer it uses 50,000 a year.
    no_transfers = shared[: shared.index("[[transfers]]")] + shared[shared.index("[[uses]]") :]
    scenario = parse_scenario(no_transfers)
    assert scenario.buyer_share(scenario.issuances[0]) == 60000
    assert {u.action for u in scenario.uses} == {"use-oimp"}
    with pytest.raises(ScenarioError, match=r"uses\[0\]\.quantity: by 2023 KOR would use"):
        parse_scenario(no_transfers.replace("quantity = 50000", "quantity = 60001"))
