"""The core enums mirror the proto enums exactly, and docs/codes.md lists every code."""

from __future__ import annotations

import enum
import re
from pathlib import Path
from typing import Any

import pytest

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.core.transfer import TransferState
from itmolink.core.units import FirstTransferDefinition, Purpose, UnitType
from itmolink.v1 import codes_pb2, common_pb2, transfer_pb2

CODES_MD = Path(__file__).resolve().parents[2] / "docs" / "codes.md"

# (core enum, proto enum wrapper, prefix of the proto value names); each pair must match both
# ways. The proto wrappers are typed Any: mypy-protobuf gives each its own class.
MIRRORED: list[tuple[type[enum.IntEnum], Any, str]] = [
    (RejectionCode, codes_pb2.RejectionCode, "REJECTION_CODE_"),
    (UnitType, common_pb2.UnitType, "UNIT_TYPE_"),
    (Purpose, common_pb2.Purpose, "PURPOSE_"),
    (FirstTransferDefinition, common_pb2.FirstTransferDefinition, "FIRST_TRANSFER_DEFINITION_"),
]
MIRRORED_IDS = [core.__name__ for core, _, _ in MIRRORED]


def proto_members(proto: Any, prefix: str) -> dict[str, int]:
    """Proto enum values by their name without the prefix."""
    members = {}
    for name, number in proto.items():
        assert name.startswith(prefix), f"{name} lacks the prefix {prefix}"
        members[name.removeprefix(prefix)] = number
    return members


def core_members(core: type[enum.IntEnum]) -> dict[str, int]:
    return {name: member.value for name, member in core.__members__.items()}


@pytest.mark.parametrize(("core", "proto", "prefix"), MIRRORED, ids=MIRRORED_IDS)
def test_every_core_member_is_in_the_proto_enum(
    core: type[enum.IntEnum], proto: Any, prefix: str
) -> None:
    for member in core:
        assert proto.Value(prefix + member.name) == member.value, member


@pytest.mark.parametrize(("core", "proto", "prefix"), MIRRORED, ids=MIRRORED_IDS)
def test_no_proto_value_is_missing_from_the_core_enum(
    core: type[enum.IntEnum], proto: Any, prefix: str
) -> None:
    assert core_members(core) == proto_members(proto, prefix)


@pytest.mark.parametrize(
    "core", [RejectionCode, UnitType, Purpose, FirstTransferDefinition, TransferState]
)
def test_core_enum_has_no_aliases(core: type[enum.IntEnum]) -> None:
    # Two names with one number would make the second a silent alias that iteration skips.
    assert len(core.__members__) == len(list(core))


def test_transfer_state_matches_the_proto_enum() -> None:
    proto = proto_members(transfer_pb2.TransferState, "TRANSFER_STATE_")
    for member in TransferState:
        assert proto[member.name] == member.value, member
    # The proto enum also has the proto3 default and UNKNOWN ("no record of the transfer"),
    # which are answers on the wire, never the state of a stored transfer; core omits them.
    extra = {
        name: number for name, number in proto.items() if name not in TransferState.__members__
    }
    assert extra == {"UNSPECIFIED": 0, "UNKNOWN": 6}


@pytest.mark.parametrize("code", list(RejectionCode), ids=lambda c: c.name)
def test_wire_name_is_the_proto_value_name(code: RejectionCode) -> None:
    assert code.wire_name == "REJECTION_CODE_" + code.name
    assert codes_pb2.RejectionCode.DESCRIPTOR.values_by_number[code].name == code.wire_name


@pytest.mark.parametrize("code", [c for c in RejectionCode if c != RejectionCode.UNSPECIFIED])
def test_codes_are_grouped_by_thousands(code: RejectionCode) -> None:
    assert 1 <= code.value // 1000 <= 5
    assert 1 <= code.value % 1000 <= 999


def test_rejected_carries_code_and_detail() -> None:
    exc = Rejected(RejectionCode.BAD_SIGNATURE, "signature by key 'k' does not verify")
    assert exc.code is RejectionCode.BAD_SIGNATURE
    assert exc.detail == "signature by key 'k' does not verify"
    assert str(exc).startswith("REJECTION_CODE_BAD_SIGNATURE")
    assert isinstance(exc, Exception)


# docs/codes.md


def doc_text() -> str:
    return CODES_MD.read_text(encoding="utf-8")


def doc_table_rows() -> list[tuple[str, int, str]]:
    """(section heading, number, wire name) for every table row naming a code."""
    rows = []
    heading = ""
    row = re.compile(r"^\|\s*(\d+)\s*\|\s*`(REJECTION_CODE_[A-Z0-9_]+)`\s*\|")
    for line in doc_text().splitlines():
        if line.startswith("## "):
            heading = line
        elif match := row.match(line):
            rows.append((heading, int(match.group(1)), match.group(2)))
    return rows


@pytest.mark.parametrize("code", list(RejectionCode), ids=lambda c: c.name)
def test_every_code_appears_in_codes_md(code: RejectionCode) -> None:
    assert re.search(rf"\b{code.wire_name}\b", doc_text()), f"{code.wire_name} not documented"


def test_codes_md_names_no_code_that_does_not_exist() -> None:
    named = set(re.findall(r"REJECTION_CODE_[A-Z0-9_]+", doc_text()))
    assert named <= {code.wire_name for code in RejectionCode}


def test_codes_md_has_one_row_per_code_with_its_number_under_its_group() -> None:
    rows = doc_table_rows()
    wire_names = [name for _, _, name in rows]
    assert len(wire_names) == len(set(wire_names)), "a code has two rows"
    expected = {c.wire_name for c in RejectionCode if c != RejectionCode.UNSPECIFIED}
    assert set(wire_names) == expected
    for heading, number, name in rows:
        code = codes_pb2.RejectionCode.Value(name)
        assert number == code, f"{name} is listed as {number}, but its number is {code}"
        assert heading.startswith(f"## {number // 1000}xxx"), f"{name} is under {heading!r}"
