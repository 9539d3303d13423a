"""Serial blocks: split, take, coalesce, check_disjoint, validate_block."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from itmolink.core.blocks import (
    MAX_SERIAL,
    Block,
    check_disjoint,
    coalesce,
    take,
    total,
    validate_block,
)
from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.units import UnitType


def block(start: int, end: int, **attributes: object) -> Block:
    fields: dict[str, object] = {
        "originating_registry": "LAO-NR",
        "unit_type": UnitType.ITMO,
        "vintage": 2023,
        "activity_id": "LAO-ACT-1",
        "authorisation_id": "LAO-AUTH-1",
        "cooperative_approach_id": "LAO-KOR-2023",
        "first_transferring_party": "LAO",
    }
    fields.update(attributes)
    return Block(serial_start=start, serial_end=end, **fields)  # type: ignore[arg-type]


def units(blocks: Iterable[Block]) -> list[tuple[object, ...]]:
    """Every unit of ``blocks`` with its attributes, sorted (a multiset, duplicates kept)."""
    return sorted(
        (b.originating_registry, serial, b.attributes())
        for b in blocks
        for serial in range(b.serial_start, b.serial_end + 1)
    )


def rejected_code(excinfo: pytest.ExceptionInfo[Rejected]) -> RejectionCode:
    return excinfo.value.code


# Block basics


def test_quantity_is_inclusive() -> None:
    assert block(1, 1).quantity == 1
    assert block(1, 100).quantity == 100
    assert block(MAX_SERIAL - 9, MAX_SERIAL).quantity == 10


def test_attributes_exclude_the_serial_range() -> None:
    assert block(1, 10).attributes() == block(500, 900).attributes()
    assert block(1, 10).attributes() != block(1, 10, vintage=2024).attributes()


def test_label_names_registry_and_range() -> None:
    assert block(5, 9).label() == "LAO-NR:5-9"


# split


def test_split_whole_block_returns_it_and_no_remainder() -> None:
    original = block(101, 200)
    assert original.split(100) == (original, None)


def test_split_single_unit_block() -> None:
    original = block(7, 7)
    assert original.split(1) == (original, None)


def test_split_one_unit_from_a_larger_block() -> None:
    original = block(101, 200, vintage=2025)
    head, tail = original.split(1)
    assert head == dataclasses.replace(original, serial_end=101)
    assert tail == dataclasses.replace(original, serial_start=102)


def test_split_keeps_attributes_and_leaves_no_gap() -> None:
    original = block(1, 1000, unit_type=UnitType.A6_4ER_AUTHORISED)
    head, tail = original.split(300)
    assert tail is not None
    assert (head.serial_start, head.serial_end) == (1, 300)
    assert (tail.serial_start, tail.serial_end) == (301, 1000)
    assert head.attributes() == tail.attributes() == original.attributes()


@pytest.mark.parametrize("quantity", [0, -1, -100, 101, 10**6])
def test_split_rejects_quantities_outside_the_block(quantity: int) -> None:
    with pytest.raises(ValueError):
        block(1, 100).split(quantity)


@given(
    start=st.integers(1, MAX_SERIAL),
    size=st.integers(1, 10**12),
    data=st.data(),
)
def test_split_partitions_the_block(start: int, size: int, data: st.DataObject) -> None:
    end = min(start + size - 1, MAX_SERIAL)
    original = block(start, end)
    quantity = data.draw(st.integers(1, original.quantity))
    head, tail = original.split(quantity)
    assert head.serial_start == start
    assert head.quantity == quantity
    if tail is None:
        assert head == original
    else:
        assert head.serial_end + 1 == tail.serial_start
        assert tail.serial_end == end
        assert head.quantity + tail.quantity == original.quantity


# overlaps


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((1, 10), (10, 20), True),
        ((1, 10), (11, 20), False),
        ((5, 6), (1, 100), True),
        ((1, 1), (1, 1), True),
        ((20, 30), (1, 19), False),
    ],
)
def test_overlaps_same_registry(a: tuple[int, int], b: tuple[int, int], expected: bool) -> None:
    assert block(*a).overlaps(block(*b)) is expected
    assert block(*b).overlaps(block(*a)) is expected


def test_same_serials_in_different_registries_do_not_overlap() -> None:
    assert not block(1, 10).overlaps(block(1, 10, originating_registry="KOR-NR"))


# take


def test_take_uses_serial_order_not_input_order() -> None:
    late, early = block(501, 600), block(1, 100)
    taken, remainders = take([late, early], 100)
    assert taken == [early]
    assert remainders == []


def test_take_orders_by_registry_then_serial() -> None:
    b = block(1, 10, originating_registry="B-NR")
    a_high = block(50, 59, originating_registry="A-NR")
    a_low = block(20, 29, originating_registry="A-NR")
    taken, remainders = take([b, a_high, a_low], 25)
    assert taken == [a_low, a_high, block(1, 5, originating_registry="B-NR")]
    assert remainders == [block(6, 10, originating_registry="B-NR")]


def test_take_splits_only_the_last_block() -> None:
    holdings = [block(1, 100), block(201, 300), block(401, 500)]
    taken, remainders = take(holdings, 150)
    assert taken == [block(1, 100), block(201, 250)]
    assert remainders == [block(251, 300)]


def test_take_exactly_everything() -> None:
    holdings = [block(201, 300), block(1, 100)]
    taken, remainders = take(holdings, 200)
    assert taken == [block(1, 100), block(201, 300)]
    assert remainders == []


def test_take_exactly_one_whole_block_leaves_the_rest_untouched() -> None:
    taken, remainders = take([block(1, 100), block(201, 300)], 100)
    assert taken == [block(1, 100)]
    assert remainders == []


def test_take_one_unit() -> None:
    taken, remainders = take([block(10, 19)], 1)
    assert taken == [block(10, 10)]
    assert remainders == [block(11, 19)]


def test_take_from_a_huge_block_costs_one_split() -> None:
    taken, remainders = take([block(1, MAX_SERIAL)], 10**18)
    assert taken == [block(1, 10**18)]
    assert remainders == [block(10**18 + 1, MAX_SERIAL)]


@pytest.mark.parametrize(
    ("holdings", "quantity"),
    [
        ([block(1, 100)], 101),
        ([block(1, 100), block(201, 300)], 201),
        ([], 1),
    ],
)
def test_take_insufficient_holdings(holdings: list[Block], quantity: int) -> None:
    with pytest.raises(Rejected) as excinfo:
        take(holdings, quantity)
    assert rejected_code(excinfo) is RejectionCode.INSUFFICIENT_HOLDINGS


@pytest.mark.parametrize("quantity", [0, -1, -(10**9)])
def test_take_non_positive_quantity(quantity: int) -> None:
    with pytest.raises(Rejected) as excinfo:
        take([block(1, 100)], quantity)
    assert rejected_code(excinfo) is RejectionCode.QUANTITY_MISMATCH


def test_take_checks_quantity_before_holdings() -> None:
    with pytest.raises(Rejected) as excinfo:
        take([], 0)
    assert rejected_code(excinfo) is RejectionCode.QUANTITY_MISMATCH


def test_take_does_not_modify_its_input() -> None:
    holdings = [block(201, 300), block(1, 100)]
    before = list(holdings)
    take(holdings, 150)
    assert holdings == before


# coalesce


def test_coalesce_merges_adjacent_blocks_with_equal_attributes() -> None:
    assert coalesce([block(201, 300), block(1, 100), block(101, 200)]) == [block(1, 300)]


def test_coalesce_keeps_a_gap() -> None:
    assert coalesce([block(1, 100), block(102, 200)]) == [block(1, 100), block(102, 200)]


@pytest.mark.parametrize(
    "different",
    [
        {"originating_registry": "KOR-NR"},
        {"unit_type": UnitType.A6_4ER_AUTHORISED},
        {"vintage": 2024},
        {"activity_id": "LAO-ACT-2"},
        {"authorisation_id": "LAO-AUTH-2"},
        {"cooperative_approach_id": "LAO-JPN-JCM"},
        {"first_transferring_party": "KOR"},
    ],
    ids=lambda d: next(iter(d)),
)
def test_coalesce_does_not_merge_different_attributes(different: dict[str, object]) -> None:
    first, second = block(1, 100), block(101, 200, **different)
    assert sorted(coalesce([first, second])) == sorted([first, second])


def test_coalesce_does_not_hide_an_overlap() -> None:
    # Overlapping blocks are an integrity error for check_disjoint, not something to merge away.
    assert coalesce([block(1, 100), block(50, 150)]) == [block(1, 100), block(50, 150)]


def test_coalesce_empty() -> None:
    assert coalesce([]) == []


# check_disjoint


@pytest.mark.parametrize(
    "blocks",
    [
        [],
        [block(1, 100)],
        [block(1, 100), block(101, 200)],
        [block(301, 400), block(1, 100), block(101, 200)],
        [block(1, 100), block(1, 100, originating_registry="KOR-NR")],
        [block(1, 100), block(50, 60, originating_registry="KOR-NR"), block(101, 101)],
    ],
)
def test_check_disjoint_accepts_disjoint_blocks(blocks: list[Block]) -> None:
    check_disjoint(blocks)


@pytest.mark.parametrize(
    "blocks",
    [
        [block(1, 100), block(100, 200)],
        [block(1, 100), block(1, 100)],
        [block(1, 100), block(40, 60)],
        [block(40, 60), block(1, 100)],
        [block(1, 100), block(300, 400), block(50, 60)],
        [block(1, 10), block(200, 300), block(20, 30), block(250, 250)],
        [block(1, 100, vintage=2023), block(50, 150, vintage=2024)],
        [block(1, 100), block(1, 100, originating_registry="KOR-NR"), block(100, 100)],
    ],
)
def test_check_disjoint_rejects_overlap_in_one_registry(blocks: list[Block]) -> None:
    with pytest.raises(Rejected) as excinfo:
        check_disjoint(blocks)
    assert rejected_code(excinfo) is RejectionCode.OVERLAPPING_BLOCKS


# validate_block


@pytest.mark.parametrize(
    "valid",
    [block(1, 1), block(1, MAX_SERIAL), block(MAX_SERIAL, MAX_SERIAL), block(10, 20)],
)
def test_validate_block_accepts(valid: Block) -> None:
    validate_block(valid)


@pytest.mark.parametrize(
    "invalid",
    [
        block(1, 10, originating_registry=""),
        block(0, 10),
        block(-5, 10),
        block(11, 10),
        block(1, MAX_SERIAL + 1),
        block(MAX_SERIAL + 1, MAX_SERIAL + 1),
        block(1, 10, unit_type=UnitType.UNSPECIFIED),
    ],
    ids=["no-registry", "start-0", "start-negative", "end-before-start", "end-too-big",
         "start-too-big", "unit-type-unspecified"],
)  # fmt: skip
def test_validate_block_rejects(invalid: Block) -> None:
    with pytest.raises(Rejected) as excinfo:
        validate_block(invalid)
    assert rejected_code(excinfo) is RejectionCode.INVALID_BLOCK


# Properties

REGISTRIES = ["KOR-NR", "LAO-NR"]


@st.composite
def disjoint_holdings(draw: st.DrawFn) -> list[Block]:
    """Up to 8 disjoint blocks over two registries, some adjacent, in arbitrary order."""
    blocks = []
    next_start = dict.fromkeys(REGISTRIES, 1)
    for _ in range(draw(st.integers(0, 8))):
        registry = draw(st.sampled_from(REGISTRIES))
        start = next_start[registry] + draw(st.integers(0, 3))
        end = start + draw(st.integers(0, 15))
        next_start[registry] = end + 1
        blocks.append(
            block(
                start,
                end,
                originating_registry=registry,
                vintage=draw(st.sampled_from([2023, 2024])),
                unit_type=draw(st.sampled_from([UnitType.ITMO, UnitType.A6_4ER_AUTHORISED])),
            )
        )
    return draw(st.permutations(blocks))


@given(holdings=disjoint_holdings(), data=st.data())
def test_take_conserves_units(holdings: list[Block], data: st.DataObject) -> None:
    available = total(holdings)
    if available == 0:
        return
    quantity = data.draw(st.integers(1, available))
    taken, remainders = take(holdings, quantity)

    assert total(taken) == quantity
    assert len(remainders) <= 1
    check_disjoint(taken)

    # Blocks that take() neither took from nor split stay with the holder as they were.
    consumed = {(b.originating_registry, b.serial_start) for b in taken}
    untouched = [b for b in holdings if (b.originating_registry, b.serial_start) not in consumed]
    after = taken + remainders + untouched
    assert total(after) == available
    check_disjoint(after)
    assert units(after) == units(holdings)

    # What is taken is the first ``quantity`` units in (registry, serial) order.
    assert units(taken) == units(holdings)[:quantity]


@given(holdings=disjoint_holdings(), data=st.data())
def test_coalesce_preserves_units_and_is_maximal(
    holdings: list[Block], data: st.DataObject
) -> None:
    merged = coalesce(holdings)
    assert total(merged) == total(holdings)
    assert units(merged) == units(holdings)
    check_disjoint(merged)
    assert len(merged) <= len(holdings)
    # No two results could be merged further.
    for a in merged:
        for b in merged:
            assert not (a.attributes() == b.attributes() and a.serial_end + 1 == b.serial_start)
    # Order of the input does not matter, and a second pass changes nothing.
    assert coalesce(data.draw(st.permutations(holdings))) == merged
    assert coalesce(merged) == merged
