"""Corresponding adjustments booked by each side of a completed transfer."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from itmolink.core.adjustments import (
    METHOD_VINTAGE_YEAR,
    AdjustmentEntry,
    adjustments_for,
    books_adjustment,
    expected_adjustments,
    oimp_at_issuance,
)
from itmolink.core.blocks import Block
from itmolink.core.transfer import Role
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType


def block(start: int, end: int, **changes: object) -> Block:
    base = Block(
        originating_registry="LAO-NR",
        serial_start=start,
        serial_end=end,
        unit_type=UnitType.ITMO,
        vintage=2023,
        activity_id="LAO-ACT-1",
        authorisation_id="LAO-AUTH-1",
        cooperative_approach_id="LAO-KOR-2023",
        first_transferring_party="LAO",
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def sender(blocks: list[Block]) -> list[AdjustmentEntry]:
    return adjustments_for(Role.SENDER, "LAO", "KOR", "T-1", blocks)


def receiver(blocks: list[Block]) -> list[AdjustmentEntry]:
    return adjustments_for(Role.RECEIVER, "KOR", "LAO", "T-1", blocks)


def amounts(entries: list[AdjustmentEntry]) -> dict[tuple[int, UnitType], int]:
    return {(e.year, e.unit_type): e.amount for e in entries}


BLOCKS = [block(1, 100), block(201, 250), block(301, 330, vintage=2024)]


def test_sender_books_positive_entries() -> None:
    assert sender(BLOCKS) == [
        AdjustmentEntry("LAO", "KOR", "T-1", 2023, 150, UnitType.ITMO, METHOD_VINTAGE_YEAR),
        AdjustmentEntry("LAO", "KOR", "T-1", 2024, 30, UnitType.ITMO, METHOD_VINTAGE_YEAR),
    ]
    # The method is stored with every entry; the year booked is the vintage.
    assert METHOD_VINTAGE_YEAR == "vintage-year"


def test_receiver_books_negative_entries() -> None:
    assert receiver(BLOCKS) == [
        AdjustmentEntry("KOR", "LAO", "T-1", 2023, -150, UnitType.ITMO, METHOD_VINTAGE_YEAR),
        AdjustmentEntry("KOR", "LAO", "T-1", 2024, -30, UnitType.ITMO, METHOD_VINTAGE_YEAR),
    ]


def test_sender_and_receiver_are_equal_and_opposite() -> None:
    out, in_ = amounts(sender(BLOCKS)), amounts(receiver(BLOCKS))
    assert out.keys() == in_.keys()
    assert all(out[key] == -in_[key] for key in out)


def test_grouped_per_vintage_and_unit_type() -> None:
    blocks = [
        block(1, 10, vintage=2023),
        block(11, 30, vintage=2023, unit_type=UnitType.A6_4ER_AUTHORISED),
        block(31, 70, vintage=2024),
        block(71, 150, vintage=2023),
    ]
    assert amounts(sender(blocks)) == {
        (2023, UnitType.ITMO): 90,
        (2023, UnitType.A6_4ER_AUTHORISED): 20,
        (2024, UnitType.ITMO): 40,
    }
    assert len(sender(blocks)) == 3


def test_entries_are_sorted_by_year_then_unit_type() -> None:
    blocks = [
        block(1, 10, vintage=2026),
        block(11, 20, vintage=2024, unit_type=UnitType.A6_4ER_AUTHORISED),
        block(21, 30, vintage=2024),
    ]
    assert [(e.year, e.unit_type) for e in sender(blocks)] == [
        (2024, UnitType.ITMO),
        (2024, UnitType.A6_4ER_AUTHORISED),
        (2026, UnitType.ITMO),
    ]


@pytest.mark.parametrize(
    "unit_type", [UnitType.A6_4ER_MITIGATION_CONTRIBUTION, UnitType.TRANSITIONED_CER]
)
def test_unit_types_without_adjustment_produce_no_entry(unit_type: UnitType) -> None:
    blocks = [block(1, 100, unit_type=unit_type)]
    assert sender(blocks) == []
    assert receiver(blocks) == []


def test_only_adjusted_unit_types_count_in_a_mixed_transfer() -> None:
    blocks = [
        block(1, 100, unit_type=UnitType.A6_4ER_MITIGATION_CONTRIBUTION),
        block(101, 110),
        block(111, 200, unit_type=UnitType.TRANSITIONED_CER),
    ]
    assert amounts(sender(blocks)) == {(2023, UnitType.ITMO): 10}


def test_no_blocks_no_entries() -> None:
    assert sender([]) == []
    assert receiver([]) == []


@pytest.mark.parametrize(
    ("unit_type", "expected"),
    [
        (UnitType.ITMO, True),
        (UnitType.A6_4ER_AUTHORISED, True),
        (UnitType.A6_4ER_MITIGATION_CONTRIBUTION, False),
        (UnitType.TRANSITIONED_CER, False),
        (UnitType.UNSPECIFIED, False),
    ],
)
def test_requires_adjustment(unit_type: UnitType, expected: bool) -> None:
    assert unit_type.requires_adjustment is expected


transfer_blocks = st.lists(
    st.builds(
        block,
        start=st.just(1),
        end=st.integers(1, 10**12),
        vintage=st.integers(2021, 2035),
        unit_type=st.sampled_from(list(UnitType)),
    ),
    max_size=12,
)


@given(transfer_blocks)
def test_adjustments_balance_and_match_the_adjusted_units(blocks: list[Block]) -> None:
    out, in_ = sender(blocks), receiver(blocks)
    expected: Counter[tuple[int, UnitType]] = Counter()
    for b in blocks:
        if b.unit_type in (UnitType.ITMO, UnitType.A6_4ER_AUTHORISED):
            expected[(b.vintage, b.unit_type)] += b.quantity
    assert amounts(out) == dict(expected)
    assert amounts(in_) == {key: -amount for key, amount in expected.items()}
    # One entry per (year, unit type), and none of zero.
    assert len(out) == len(amounts(out))
    assert all(e.amount > 0 for e in out)
    assert all(e.amount < 0 for e in in_)


@pytest.mark.parametrize(
    ("role", "host_sends", "first_transfer", "ndc", "at_issuance", "books"),
    [
        # The receiver, and an onward sender, book units authorised for NDC use only.
        (Role.RECEIVER, True, True, True, False, True),
        (Role.RECEIVER, True, False, True, True, True),
        (Role.RECEIVER, True, False, False, True, False),
        (Role.SENDER, False, False, True, False, True),
        (Role.SENDER, False, True, False, False, False),
        # The host books NDC units at their transfer, whatever the flag says...
        (Role.SENDER, True, True, True, False, True),
        (Role.SENDER, True, False, True, False, True),
        # ...unless they may have been adjusted at issuance: then the flag tells.
        (Role.SENDER, True, True, True, True, True),
        (Role.SENDER, True, False, True, True, False),
        # OIMP-only units: never at the transfer.
        (Role.SENDER, True, True, False, True, False),
        (Role.SENDER, True, False, False, False, False),
    ],
)
def test_who_books_for_a_transfer(
    role: Role, host_sends: bool, first_transfer: bool, ndc: bool, at_issuance: bool, books: bool
) -> None:
    found = books_adjustment(
        role, host_sends=host_sends, first_transfer=first_transfer, ndc=ndc,
        oimp_at_issuance=at_issuance,
    )  # fmt: skip
    assert found is books


def test_only_oimp_first_transferred_at_authorisation_or_issuance_is_adjusted_at_issuance() -> None:
    for definition in FirstTransferDefinition:
        expected = definition in (
            FirstTransferDefinition.AT_AUTHORISATION,
            FirstTransferDefinition.AT_ISSUANCE,
        )
        assert oimp_at_issuance([Purpose.NDC, Purpose.OIMP], definition) is expected
        assert oimp_at_issuance([Purpose.OIMP], definition) is expected
        assert oimp_at_issuance([Purpose.NDC], definition) is False


def test_the_expected_pairs_are_what_each_side_books() -> None:
    blocks = [
        block(1, 10),
        block(11, 15, vintage=2024),
        block(16, 20, unit_type=UnitType.A6_4ER_MITIGATION_CONTRIBUTION),
    ]
    for role in Role:
        booked = adjustments_for(role, "LAO", "KOR", "LAO-T-1", blocks)
        assert expected_adjustments(role, blocks) == tuple(
            sorted((e.year, e.amount) for e in booked)
        )
    assert expected_adjustments(Role.SENDER, blocks) == ((2023, 10), (2024, 5))
    assert expected_adjustments(Role.RECEIVER, blocks) == ((2023, -10), (2024, -5))
