"""The block identifier's text form: canonical, documented, and round-tripping exactly."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from itmolink.core.blocks import MAX_SERIAL, Block
from itmolink.core.identifier import (
    UNIT_TYPE_TOKENS,
    BlockIdentifier,
    format_identifier,
    identifier_of,
    parse_identifier,
)
from itmolink.core.units import UnitType

EXAMPLE = BlockIdentifier(
    unit_type=UnitType.ITMO,
    cooperative_approach_id="LAO-KOR-2023",
    originating_registry="LAO-NR",
    first_transferring_party="LAO",
    serial_start=1,
    serial_end=1000,
    vintage=2025,
)


def test_documented_example() -> None:
    assert format_identifier(EXAMPLE) == "ITMO:LAO-KOR-2023:LAO-NR:LAO:1-1000:2025"
    assert parse_identifier("ITMO:LAO-KOR-2023:LAO-NR:LAO:1-1000:2025") == EXAMPLE


@pytest.mark.parametrize(
    ("unit_type", "token"),
    [
        (UnitType.ITMO, "ITMO"),
        (UnitType.A6_4ER_AUTHORISED, "A64ER"),
        (UnitType.A6_4ER_MITIGATION_CONTRIBUTION, "A64MCU"),
        (UnitType.TRANSITIONED_CER, "CER"),
    ],
)
def test_unit_type_tokens(unit_type: UnitType, token: str) -> None:
    identifier = dataclasses.replace(EXAMPLE, unit_type=unit_type)
    assert format_identifier(identifier).startswith(token + ":")
    assert parse_identifier(format_identifier(identifier)).unit_type is unit_type


@pytest.mark.parametrize(
    ("field", "value", "encoded"),
    [
        ("cooperative_approach_id", "CA0001", "CA0001"),
        ("cooperative_approach_id", "JCM Lao:Japan", "JCM%20Lao%3AJapan"),
        ("originating_registry", "LAO%01", "LAO%2501"),
        ("first_transferring_party", "LAÖ", "LA%C3%96"),
        ("cooperative_approach_id", "a~b_c.d-e", "a~b_c.d-e"),
    ],
)
def test_text_fields_are_percent_encoded(field: str, value: str, encoded: str) -> None:
    identifier = dataclasses.replace(EXAMPLE, **{field: value})  # type: ignore[arg-type]
    text = format_identifier(identifier)
    assert encoded in text.split(":")
    assert parse_identifier(text) == identifier


def test_identifier_of_block() -> None:
    block = Block(
        originating_registry="LAO-NR",
        serial_start=1,
        serial_end=1000,
        unit_type=UnitType.ITMO,
        vintage=2025,
        activity_id="LAO-ACT-1",
        authorisation_id="LAO-A-0001",
        cooperative_approach_id="LAO-KOR-2023",
        first_transferring_party="LAO",
    )
    assert identifier_of(block) == EXAMPLE
    assert identifier_of(block).quantity == 1000


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "fields"),
        ("ITMO:LAO-KOR-2023:LAO-NR:LAO:1-1000", "fields"),
        ("ITMO:LAO-KOR-2023:LAO-NR:LAO:1-1000:2025:x", "fields"),
        ("XYZ:LAO-KOR-2023:LAO-NR:LAO:1-1000:2025", "unit type"),
        ("itmo:LAO-KOR-2023:LAO-NR:LAO:1-1000:2025", "unit type"),
        ("ITMO::LAO-NR:LAO:1-1000:2025", "must not be empty"),
        ("ITMO:LAO-KOR-2023::LAO:1-1000:2025", "must not be empty"),
        ("ITMO:LAO-KOR-2023:LAO-NR::1-1000:2025", "must not be empty"),
        ("ITMO:LAO-KOR-2023:LAO-NR:LAO:1000:2025", "first-last"),
        ("ITMO:LAO-KOR-2023:LAO-NR:LAO:0-1000:2025", "first serial"),
        ("ITMO:LAO-KOR-2023:LAO-NR:LAO:01-1000:2025", "first serial"),
        ("ITMO:LAO-KOR-2023:LAO-NR:LAO:-1-1000:2025", "first serial"),
        ("ITMO:LAO-KOR-2023:LAO-NR:LAO:1-+1000:2025", "last serial"),
        ("ITMO:LAO-KOR-2023:LAO-NR:LAO:1-1000-2:2025", "last serial"),
        ("ITMO:LAO-KOR-2023:LAO-NR:LAO:1000-1:2025", "serial range"),
        (f"ITMO:LAO-KOR-2023:LAO-NR:LAO:1-{MAX_SERIAL + 1}:2025", "serial range"),
        ("ITMO:LAO-KOR-2023:LAO-NR:LAO:1-1000:02025", "vintage"),
        ("ITMO:LAO-KOR-2023:LAO-NR:LAO:1-1000:10000", "vintage"),
        ("ITMO:LAO-KOR-2023:LAO-NR:LAO:1-1000:", "vintage"),
        ("ITMO:LAO-KOR-2023:LAO-NR:LAO:1-1000:２０２５", "vintage"),
        # Not canonical: lower-case hex, a needless escape, a raw space.
        ("ITMO:JCM%3aX:LAO-NR:LAO:1-1000:2025", "canonically escaped"),
        ("ITMO:%4CAO:LAO-NR:LAO:1-1000:2025", "canonically escaped"),
        ("ITMO:JCM X:LAO-NR:LAO:1-1000:2025", "canonically escaped"),
        ("ITMO:%FF:LAO-NR:LAO:1-1000:2025", "not UTF-8"),
    ],
)
def test_malformed_text_is_a_clear_value_error(text: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=complaint) as info:
        parse_identifier(text)
    assert repr(text) in str(info.value)


@pytest.mark.parametrize(
    "changes",
    [
        {"unit_type": UnitType.UNSPECIFIED},
        {"cooperative_approach_id": ""},
        {"serial_start": 0},
        {"serial_start": 5, "serial_end": 4},
        {"serial_end": MAX_SERIAL + 1},
        {"vintage": 0},
    ],
)
def test_an_identifier_cannot_be_built_malformed(changes: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        dataclasses.replace(EXAMPLE, **changes)  # type: ignore[arg-type]


identifiers = st.builds(
    lambda unit_type, approach, registry, party, start, length, vintage: BlockIdentifier(
        unit_type=unit_type,
        cooperative_approach_id=approach,
        originating_registry=registry,
        first_transferring_party=party,
        serial_start=start,
        serial_end=min(start + length, MAX_SERIAL),
        vintage=vintage,
    ),
    st.sampled_from(list(UNIT_TYPE_TOKENS)),
    st.text(min_size=1),
    st.text(min_size=1),
    st.text(min_size=1),
    st.integers(1, MAX_SERIAL),
    st.integers(0, 10**12),
    st.integers(1, 9999),
)


@given(identifiers)
def test_round_trip(identifier: BlockIdentifier) -> None:
    text = format_identifier(identifier)
    assert parse_identifier(text) == identifier
    assert format_identifier(parse_identifier(text)) == text
    # The text is printable and needs no quoting in CSV, logs or a shell word.
    assert text.isprintable()
    assert all(ch.isascii() and not ch.isspace() and ch not in "\",;'" for ch in text)


@given(st.text())
def test_any_text_parses_canonically_or_is_refused(text: str) -> None:
    try:
        identifier = parse_identifier(text)
    except ValueError:
        return
    assert format_identifier(identifier) == text
