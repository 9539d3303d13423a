"""Article 6 checks: each case changes one fact of a passing case and names the code expected."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from itmolink.core.blocks import Block
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.rules import (
    AuthorisationTerms,
    check_authorisation_terms,
    check_issuance,
    check_not_held,
    check_received_authorisation,
    check_transfer_proposal,
    check_transfer_request,
    check_vintage,
)
from itmolink.core.units import Purpose, UnitType

C = RejectionCode

TERMS = AuthorisationTerms(
    authorisation_id="LAO-AUTH-1",
    version=1,
    host_party="LAO",
    activity_id="LAO-ACT-1",
    cooperative_approach_id="LAO-KOR-2023",
    acquiring_parties=frozenset({"KOR"}),
    purposes=frozenset({Purpose.NDC}),
    vintage_from=2023,
    vintage_to=2030,
    quantity_cap=1000,
    unit_type=UnitType.ITMO,
)


def terms(**changes: object) -> AuthorisationTerms:
    return dataclasses.replace(TERMS, **changes)  # type: ignore[arg-type]


def block(start: int, end: int, **changes: object) -> Block:
    """A block issued under TERMS."""
    base = Block(
        originating_registry="LAO-NR",
        serial_start=start,
        serial_end=end,
        unit_type=UnitType.ITMO,
        vintage=2025,
        activity_id="LAO-ACT-1",
        authorisation_id="LAO-AUTH-1",
        cooperative_approach_id="LAO-KOR-2023",
        first_transferring_party="LAO",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def code_of(check: Callable[[], None]) -> RejectionCode | None:
    """The code ``check`` rejects with, or None when it passes."""
    try:
        check()
    except Rejected as exc:
        return exc.code
    return None


# check_authorisation_terms


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, None),
        ({"purposes": frozenset({Purpose.NDC, Purpose.OIMP})}, None),
        ({"purposes": frozenset({Purpose.OIMP})}, None),
        ({"acquiring_parties": frozenset({"KOR", "JPN"})}, None),
        ({"quantity_cap": 0}, None),
        ({"vintage_from": 2021, "vintage_to": 2021}, None),
        ({"version": 7}, None),
        ({"authorisation_id": ""}, C.MISSING_FIELD),
        ({"activity_id": ""}, C.MISSING_FIELD),
        ({"acquiring_parties": frozenset()}, C.MISSING_FIELD),
        ({"acquiring_parties": frozenset({"KOR", "LAO"})}, C.NOT_ACQUIRING_PARTY),
        ({"acquiring_parties": frozenset({"LAO"})}, C.NOT_ACQUIRING_PARTY),
        ({"purposes": frozenset()}, C.MISSING_FIELD),
        ({"purposes": frozenset({Purpose.UNSPECIFIED})}, C.MISSING_FIELD),
        ({"purposes": frozenset({Purpose.NDC, Purpose.UNSPECIFIED})}, C.MISSING_FIELD),
        ({"unit_type": UnitType.UNSPECIFIED}, C.MISSING_FIELD),
        ({"version": 0}, C.MISSING_FIELD),
        ({"version": -1}, C.MISSING_FIELD),
        ({"vintage_from": 2020}, C.VINTAGE_BEFORE_2021),
        ({"vintage_from": 2020, "vintage_to": 2020}, C.VINTAGE_BEFORE_2021),
        ({"vintage_from": 2025, "vintage_to": 2024}, C.VINTAGE_NOT_AUTHORISED),
        # The first failed check names the code.
        ({"authorisation_id": "", "vintage_from": 2020}, C.MISSING_FIELD),
        ({"acquiring_parties": frozenset({"LAO"}), "version": 0}, C.NOT_ACQUIRING_PARTY),
    ],
)
def test_check_authorisation_terms(changes: dict[str, object], expected: C | None) -> None:
    assert code_of(lambda: check_authorisation_terms(terms(**changes))) is expected


# check_received_authorisation


@pytest.mark.parametrize(
    ("changes", "me", "sender", "expected"),
    [
        ({}, "KOR", "LAO", None),
        ({"acquiring_parties": frozenset({"KOR", "JPN"})}, "JPN", "LAO", None),
        ({"authorisation_id": ""}, "KOR", "LAO", C.MISSING_FIELD),
        ({"vintage_from": 2019}, "KOR", "LAO", C.VINTAGE_BEFORE_2021),
        ({}, "KOR", "JPN", C.NOT_HOST_PARTY),
        ({}, "KOR", "KOR", C.NOT_HOST_PARTY),
        ({}, "JPN", "LAO", C.NOT_ACQUIRING_PARTY),
        ({}, "LAO", "LAO", C.NOT_ACQUIRING_PARTY),
        ({}, "JPN", "JPN", C.NOT_HOST_PARTY),
    ],
)
def test_check_received_authorisation(
    changes: dict[str, object], me: str, sender: str, expected: C | None
) -> None:
    check = lambda: check_received_authorisation(terms(**changes), me=me, sender=sender)  # noqa: E731
    assert code_of(check) is expected


def test_a_version_that_removes_me_is_accepted_only_if_an_earlier_one_named_me() -> None:
    removal = terms(acquiring_parties=frozenset({"JPN"}), version=2)
    check_received_authorisation(removal, me="KOR", sender="LAO", named_before=True)
    assert (
        code_of(lambda: check_received_authorisation(removal, me="KOR", sender="LAO"))
        is C.NOT_ACQUIRING_PARTY
    )
    # The host check still comes first.
    assert (
        code_of(
            lambda: check_received_authorisation(removal, me="KOR", sender="JPN", named_before=True)
        )
        is C.NOT_HOST_PARTY
    )


# check_vintage


@pytest.mark.parametrize(
    ("changes", "vintage", "expected"),
    [
        ({}, 2023, None),
        ({}, 2027, None),
        ({}, 2030, None),
        ({}, 2022, C.VINTAGE_NOT_AUTHORISED),
        ({}, 2031, C.VINTAGE_NOT_AUTHORISED),
        ({}, 2020, C.VINTAGE_BEFORE_2021),
        ({}, 1990, C.VINTAGE_BEFORE_2021),
        ({"vintage_from": 2021}, 2021, None),
        # Even terms that (wrongly) reach back before 2021 cannot authorise an older vintage.
        ({"vintage_from": 2015}, 2020, C.VINTAGE_BEFORE_2021),
    ],
)
def test_check_vintage(changes: dict[str, object], vintage: int, expected: C | None) -> None:
    assert code_of(lambda: check_vintage(terms(**changes), vintage)) is expected


# check_issuance


@pytest.mark.parametrize(
    ("changes", "vintage", "quantity", "issued", "expected"),
    [
        ({}, 2025, 100, 0, None),
        ({}, 2025, 1000, 0, None),
        ({}, 2025, 100, 900, None),
        ({}, 2025, 101, 900, C.AUTHORISATION_CAP_EXCEEDED),
        ({}, 2025, 1, 1000, C.AUTHORISATION_CAP_EXCEEDED),
        ({}, 2025, 1001, 0, C.AUTHORISATION_CAP_EXCEEDED),
        ({"quantity_cap": 0}, 2025, 10**15, 10**15, None),
        ({}, 2025, 0, 0, C.QUANTITY_MISMATCH),
        ({}, 2025, -5, 0, C.QUANTITY_MISMATCH),
        ({}, 2020, 100, 0, C.VINTAGE_BEFORE_2021),
        ({}, 2022, 100, 0, C.VINTAGE_NOT_AUTHORISED),
        ({}, 2031, 100, 0, C.VINTAGE_NOT_AUTHORISED),
        # The first failed check names the code.
        ({}, 2031, 0, 0, C.QUANTITY_MISMATCH),
        ({}, 2031, 2000, 0, C.VINTAGE_NOT_AUTHORISED),
    ],
)
def test_check_issuance(
    changes: dict[str, object], vintage: int, quantity: int, issued: int, expected: C | None
) -> None:
    check = lambda: check_issuance(  # noqa: E731
        terms(**changes), vintage=vintage, quantity=quantity, issued=issued
    )
    assert code_of(check) is expected


# check_transfer_request


@pytest.mark.parametrize(
    ("changes", "to_party", "vintage", "acknowledged", "expected"),
    [
        ({}, "KOR", 2025, True, None),
        ({"acquiring_parties": frozenset({"KOR", "JPN"})}, "JPN", 2030, True, None),
        ({}, "JPN", 2025, True, C.NOT_ACQUIRING_PARTY),
        ({}, "LAO", 2025, True, C.NOT_ACQUIRING_PARTY),
        ({}, "KOR", 2025, False, C.AUTHORISATION_NOT_ACKNOWLEDGED),
        ({}, "KOR", 2020, True, C.VINTAGE_BEFORE_2021),
        ({}, "KOR", 2031, True, C.VINTAGE_NOT_AUTHORISED),
        # The first failed check names the code.
        ({}, "JPN", 2031, False, C.NOT_ACQUIRING_PARTY),
        ({}, "KOR", 2031, False, C.AUTHORISATION_NOT_ACKNOWLEDGED),
    ],
)
def test_check_transfer_request(
    changes: dict[str, object], to_party: str, vintage: int, acknowledged: bool, expected: C | None
) -> None:
    check = lambda: check_transfer_request(  # noqa: E731
        terms(**changes), to_party=to_party, vintage=vintage, acknowledged=acknowledged
    )
    assert code_of(check) is expected


# check_transfer_proposal

GOOD_BLOCKS = [block(1, 100), block(201, 250, vintage=2030)]


def proposal_code(
    blocks: list[Block], quantity: int, *, known: bool = True, me: str = "KOR"
) -> RejectionCode | None:
    return code_of(
        lambda: check_transfer_proposal(
            TERMS if known else None,
            authorisation_id="LAO-AUTH-1",
            me=me,
            quantity=quantity,
            blocks=blocks,
        )
    )


@pytest.mark.parametrize(
    ("known", "me", "expected"),
    [
        (True, "KOR", None),
        (False, "KOR", C.UNKNOWN_AUTHORISATION),
        (True, "JPN", C.NOT_ACQUIRING_PARTY),
        (True, "LAO", C.NOT_ACQUIRING_PARTY),
        (False, "JPN", C.UNKNOWN_AUTHORISATION),
    ],
)
def test_check_transfer_proposal_parties(known: bool, me: str, expected: C | None) -> None:
    assert proposal_code(GOOD_BLOCKS, 150, known=known, me=me) is expected


@pytest.mark.parametrize(
    ("quantity", "blocks", "expected"),
    [
        (150, GOOD_BLOCKS, None),
        (1, [block(7, 7)], None),
        (200, [block(1, 100), block(1, 100, originating_registry="JPN-NR")], None),
        (0, [], C.MISSING_FIELD),
        (100, [block(0, 99)], C.INVALID_BLOCK),
        (10, [block(20, 11)], C.INVALID_BLOCK),
        (100, [block(1, 100, originating_registry="")], C.INVALID_BLOCK),
        (100, [block(1, 100, unit_type=UnitType.UNSPECIFIED)], C.INVALID_BLOCK),
        (149, GOOD_BLOCKS, C.QUANTITY_MISMATCH),
        (151, GOOD_BLOCKS, C.QUANTITY_MISMATCH),
        (0, GOOD_BLOCKS, C.QUANTITY_MISMATCH),
        (200, [block(1, 100), block(51, 150)], C.OVERLAPPING_BLOCKS),
        (100, [block(1, 100, vintage=2020)], C.VINTAGE_BEFORE_2021),
        (100, [block(1, 100, vintage=2031)], C.VINTAGE_NOT_AUTHORISED),
        (150, [block(1, 100), block(201, 250, vintage=2022)], C.VINTAGE_NOT_AUTHORISED),
        # The first failed check names the code.
        (99, [block(0, 99)], C.INVALID_BLOCK),
        (100, [block(1, 100, activity_id="B", vintage=2031)], C.BLOCK_ATTRIBUTE_MISMATCH),
    ],
)
def test_check_transfer_proposal_blocks(
    quantity: int, blocks: list[Block], expected: C | None
) -> None:
    assert proposal_code(blocks, quantity) is expected


@pytest.mark.parametrize(
    "changes",
    [
        {"authorisation_id": "LAO-AUTH-2"},
        {"unit_type": UnitType.A6_4ER_AUTHORISED},
        {"cooperative_approach_id": "LAO-JPN-JCM"},
        {"first_transferring_party": "JPN"},
        {"activity_id": "LAO-ACT-2"},
    ],
    ids=lambda changes: next(iter(changes)),
)
def test_check_transfer_proposal_block_attributes(changes: dict[str, object]) -> None:
    # In the only block, and in the second of two blocks.
    assert proposal_code([block(1, 100, **changes)], 100) is C.BLOCK_ATTRIBUTE_MISMATCH
    blocks = [block(1, 100), block(201, 250, **changes)]
    assert proposal_code(blocks, 150) is C.BLOCK_ATTRIBUTE_MISMATCH


# check_not_held

HELD = C.SERIALS_ALREADY_HELD


@pytest.mark.parametrize(
    ("incoming", "existing", "expected"),
    [
        ([block(1, 100)], [], None),
        ([], [block(1, 100)], None),
        ([block(1, 100)], [block(101, 200)], None),
        ([block(101, 200)], [block(1, 100)], None),
        ([block(1, 100)], [block(1, 100, originating_registry="JPN-NR")], None),
        ([block(1, 100)], [block(100, 100)], HELD),
        ([block(1, 100)], [block(1, 100)], HELD),
        ([block(50, 60)], [block(1, 100)], HELD),
        ([block(1, 10), block(500, 600)], [block(300, 400), block(550, 550)], HELD),
        # Attributes do not matter: a serial is held once, whatever it is labelled.
        ([block(1, 100)], [block(1, 100, vintage=2024, activity_id="B")], HELD),
    ],
)
def test_check_not_held(incoming: list[Block], existing: list[Block], expected: C | None) -> None:
    assert code_of(lambda: check_not_held(incoming, existing)) is expected


# Transitioned CERs are pre-2021 by definition; every other unit type starts in 2021.

CER = UnitType.TRANSITIONED_CER


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"unit_type": CER, "vintage_from": 2015, "vintage_to": 2020}, None),
        ({"unit_type": CER, "vintage_from": 2013, "vintage_to": 2013}, None),
        ({"unit_type": CER, "vintage_from": 2015, "vintage_to": 2021}, C.VINTAGE_NOT_AUTHORISED),
        ({"unit_type": CER, "vintage_from": 2023, "vintage_to": 2030}, C.VINTAGE_NOT_AUTHORISED),
        ({"unit_type": CER, "vintage_from": 2020, "vintage_to": 2019}, C.VINTAGE_NOT_AUTHORISED),
        ({"unit_type": UnitType.A6_4ER_AUTHORISED, "vintage_from": 2020}, C.VINTAGE_BEFORE_2021),
    ],
)
def test_check_authorisation_terms_vintages_by_unit_type(
    changes: dict[str, object], expected: C | None
) -> None:
    assert code_of(lambda: check_authorisation_terms(terms(**changes))) is expected


@pytest.mark.parametrize(
    ("vintage", "expected"),
    [
        (2015, None),
        (2020, None),
        (2014, C.VINTAGE_NOT_AUTHORISED),
        (2021, C.VINTAGE_NOT_AUTHORISED),
        (2025, C.VINTAGE_NOT_AUTHORISED),
    ],
)
def test_check_vintage_of_transitioned_cers(vintage: int, expected: C | None) -> None:
    cer_terms = terms(unit_type=CER, vintage_from=2015, vintage_to=2020)
    assert code_of(lambda: check_vintage(cer_terms, vintage)) is expected


def test_terms_that_wrongly_reach_past_2020_cannot_give_cers_a_later_vintage() -> None:
    wrong = terms(unit_type=CER, vintage_from=2015, vintage_to=2025)
    assert code_of(lambda: check_vintage(wrong, 2022)) is C.VINTAGE_NOT_AUTHORISED
