"""Splitting an issuance: share of proceeds, OMGE, sharing ratio, in whole tonnes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from itmolink.core.blocks import MAX_SERIAL, total
from itmolink.core.codes import RejectionCode
from itmolink.core.issuance import (
    Destination,
    IssuancePolicy,
    IssuanceSplit,
    allocate_block,
    split_issuance,
)
from itmolink.core.units import UnitType
from tests.unit.article6 import block, code_of

C = RejectionCode
A64 = UnitType.A6_4ER_AUTHORISED
NONE = IssuancePolicy()
JCM = IssuancePolicy(buyer_share_bp=8000)


def parts(unit_type: UnitType, quantity: int, policy: IssuancePolicy = NONE) -> tuple[int, ...]:
    """(fund, OMGE, voluntary OMGE, buyer, host)."""
    split = split_issuance(unit_type, quantity, policy)
    return tuple(q for _, q in split.parts())


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        # Levies rounded up: 5% of 19 is 0.95 -> 1, 2% of 19 is 0.38 -> 1.
        (2, (1, 1, 0, 0, 0)),
        (19, (1, 1, 0, 0, 17)),
        (20, (1, 1, 0, 0, 18)),
        (21, (2, 1, 0, 0, 18)),
        (50, (3, 1, 0, 0, 46)),
        (51, (3, 2, 0, 0, 46)),
        (99, (5, 2, 0, 0, 92)),
        (100, (5, 2, 0, 0, 93)),
        (101, (6, 3, 0, 0, 92)),
        (10**9, (5 * 10**7, 2 * 10**7, 0, 0, 93 * 10**7)),
        (10**9 + 1, (5 * 10**7 + 1, 2 * 10**7 + 1, 0, 0, 93 * 10**7 - 1)),
    ],
)
def test_a6_4er_levies(quantity: int, expected: tuple[int, ...]) -> None:
    assert parts(A64, quantity) == expected
    # Mitigation contribution units carry the same levies.
    assert parts(UnitType.A6_4ER_MITIGATION_CONTRIBUTION, quantity) == expected


def test_one_tonne_cannot_carry_both_levies() -> None:
    assert code_of(lambda: split_issuance(A64, 1, NONE)) is C.QUANTITY_TOO_SMALL_FOR_LEVIES
    # An ITMO or a CER of one tonne carries no mandatory levy.
    assert parts(UnitType.ITMO, 1) == (0, 0, 0, 0, 1)


@pytest.mark.parametrize("quantity", [0, -1])
def test_quantity_must_be_positive(quantity: int) -> None:
    assert code_of(lambda: split_issuance(A64, quantity, NONE)) is C.QUANTITY_MISMATCH


@pytest.mark.parametrize("unit_type", [UnitType.ITMO, UnitType.TRANSITIONED_CER])
@pytest.mark.parametrize("quantity", [1, 19, 20, 99, 100, 10**9])
def test_no_mandatory_levies_outside_article_6_4(unit_type: UnitType, quantity: int) -> None:
    assert parts(unit_type, quantity) == (0, 0, 0, 0, quantity)


@pytest.mark.parametrize(
    ("unit_type", "quantity", "policy", "expected"),
    [
        # JCM-style 80% to the buyer, rounded down; the host keeps the remainder.
        (UnitType.ITMO, 100, JCM, (0, 0, 0, 80, 20)),
        (UnitType.ITMO, 19, JCM, (0, 0, 0, 15, 4)),
        (UnitType.ITMO, 1, JCM, (0, 0, 0, 0, 1)),
        (UnitType.ITMO, 19_751, JCM, (0, 0, 0, 15_800, 3_951)),
        # The ratio applies to what is left after the levies.
        (A64, 100, JCM, (5, 2, 0, 74, 19)),
        # Voluntary OMGE (6.2), rounded up like the mandatory one.
        (UnitType.ITMO, 100, IssuancePolicy(voluntary_omge_bp=200), (0, 0, 2, 0, 98)),
        (UnitType.ITMO, 1, IssuancePolicy(voluntary_omge_bp=200), (0, 0, 1, 0, 0)),
        (UnitType.ITMO, 99, IssuancePolicy(8000, 250), (0, 0, 3, 76, 20)),
        (A64, 100, IssuancePolicy(8000, 100), (5, 2, 1, 73, 19)),
        (UnitType.ITMO, 7, IssuancePolicy(buyer_share_bp=10_000), (0, 0, 0, 7, 0)),
        (UnitType.TRANSITIONED_CER, 50, IssuancePolicy(voluntary_omge_bp=10_000), (0, 0, 50, 0, 0)),
    ],
)
def test_sharing_ratio_and_voluntary_omge(
    unit_type: UnitType, quantity: int, policy: IssuancePolicy, expected: tuple[int, ...]
) -> None:
    assert parts(unit_type, quantity, policy) == expected


def test_voluntary_omge_on_top_of_mandatory_may_be_too_much() -> None:
    policy = IssuancePolicy(voluntary_omge_bp=9500)
    # 5 + 2 + 95 > 100: the levies alone exceed the issuance.
    assert code_of(lambda: split_issuance(A64, 100, policy)) is C.QUANTITY_TOO_SMALL_FOR_LEVIES


@pytest.mark.parametrize(
    "changes", [{"buyer_share_bp": -1}, {"buyer_share_bp": 10_001}, {"voluntary_omge_bp": -5}]
)
def test_policy_rates_are_basis_points(changes: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="basis points"):
        IssuancePolicy(**changes)


def test_a_split_must_add_up() -> None:
    with pytest.raises(AssertionError):
        IssuanceSplit(100, 5, 2, 0, 0, 92)


def test_allocate_block_cuts_contiguous_blocks_in_serial_order() -> None:
    issued = block(1001, 1100, unit_type=A64)
    split = split_issuance(A64, 100, JCM)
    allocated = allocate_block(issued, split)
    assert allocated == [
        (Destination.ADAPTATION_FUND, block(1001, 1005, unit_type=A64)),
        (Destination.OMGE_CANCELLATION, block(1006, 1007, unit_type=A64)),
        (Destination.BUYER_SHARE, block(1008, 1081, unit_type=A64)),
        (Destination.HOST_HOLDING, block(1082, 1100, unit_type=A64)),
    ]
    wrong = block(1, 99, unit_type=A64)
    assert code_of(lambda: allocate_block(wrong, split)) is C.QUANTITY_MISMATCH


@given(
    unit_type=st.sampled_from([A64, UnitType.ITMO, UnitType.TRANSITIONED_CER]),
    quantity=st.integers(100, MAX_SERIAL // 2),
    buyer=st.integers(0, 10_000),
    voluntary=st.integers(0, 500),
)
def test_split_adds_up_and_levies_are_never_short(
    unit_type: UnitType, quantity: int, buyer: int, voluntary: int
) -> None:
    policy = IssuancePolicy(buyer_share_bp=buyer, voluntary_omge_bp=voluntary)
    split = split_issuance(unit_type, quantity, policy)
    assert sum(q for _, q in split.parts()) == quantity
    assert all(q >= 0 for _, q in split.parts())
    if unit_type is A64:
        assert split.adaptation_fund * 100 >= quantity * 5
        assert (split.adaptation_fund - 1) * 100 < quantity * 5
        assert split.omge_cancellation * 100 >= quantity * 2
    assert split.voluntary_omge_cancellation * 10_000 >= quantity * voluntary
    net = quantity - split.adaptation_fund - split.omge_cancellation
    net -= split.voluntary_omge_cancellation
    assert split.buyer_share * 10_000 <= net * buyer < (split.buyer_share + 1) * 10_000
    allocated = allocate_block(block(1, quantity, unit_type=unit_type), split)
    assert total(b for _, b in allocated) == quantity
