"""The unique identifier of a unit block, and its printable text form.

Decision 6/CMA.4 (annex I, para. 5) asks that every ITMO carry a unique
identifier made of at least the cooperative approach, the originating
party's registry, the first transferring party, a serial number and the
vintage. Units here live in serial blocks, so the identifier names a whole
range; a single unit is a block whose first and last serials are equal. The
unit type is part of it too, because an A6.4ER and an ITMO with the same
serials in the same registry would be two different claims.

Text format (version 1)::

    <type>:<approach>:<registry>:<party>:<first>-<last>:<vintage>

naming the unit type, the cooperative approach, the originating registry, the
first transferring party, the first and last serial, and the vintage; for
example ``ITMO:LAO-KOR-2023:LAO-NR:LAO:1-1000:2025``.

- ``<type>`` is one of ``ITMO``, ``A64ER``, ``A64MCU``, ``CER`` (Article
  6.2 ITMO, authorised A6.4ER, A6.4 mitigation contribution unit, transitioned
  CDM CER).
- The three text fields are non-empty and percent-encoded (RFC 3986, UTF-8):
  every character other than ``A-Z a-z 0-9 - . _ ~`` is written ``%XX`` with
  upper-case hex digits. So ``:`` never occurs inside a field, and any id a
  registry uses, spaces and all, survives the trip.
- Serials are decimal integers without sign or leading zeros, with
  1 <= first <= last <= 2^63 - 1 (what the stores hold natively).
- The vintage is a decimal year, 1 to 9999, written without leading zeros.

The format is canonical: each identifier has exactly one text, so
``parse(format(x)) == x`` and ``format(parse(s)) == s``. ``parse`` refuses any
other spelling (lower-case hex, needless escapes, leading zeros) with a
ValueError saying what was wrong, so two registries that compare texts
compare identifiers.
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from itmolink.core.blocks import MAX_SERIAL, Block
from itmolink.core.units import UnitType

UNIT_TYPE_TOKENS: dict[UnitType, str] = {
    UnitType.ITMO: "ITMO",
    UnitType.A6_4ER_AUTHORISED: "A64ER",
    UnitType.A6_4ER_MITIGATION_CONTRIBUTION: "A64MCU",
    UnitType.TRANSITIONED_CER: "CER",
}
_TOKEN_TYPES = {token: unit_type for unit_type, token in UNIT_TYPE_TOKENS.items()}
_SAFE = "-._~"  # with ASCII letters and digits, RFC 3986 unreserved characters
_NUMBER = re.compile(r"[1-9][0-9]*")


@dataclass(frozen=True, slots=True, order=True)
class BlockIdentifier:
    """What identifies a block of units anywhere in the Article 6 system."""

    unit_type: UnitType
    cooperative_approach_id: str
    originating_registry: str
    first_transferring_party: str
    serial_start: int
    serial_end: int
    vintage: int

    def __post_init__(self) -> None:
        if self.unit_type not in UNIT_TYPE_TOKENS:
            raise ValueError(f"unit type {self.unit_type!r} has no identifier token")
        for name in ("cooperative_approach_id", "originating_registry", "first_transferring_party"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if not 1 <= self.serial_start <= self.serial_end <= MAX_SERIAL:
            raise ValueError(
                f"serial range {self.serial_start}-{self.serial_end} is not "
                f"1 <= first <= last <= {MAX_SERIAL}"
            )
        if not 1 <= self.vintage <= 9999:
            raise ValueError(f"vintage {self.vintage} is not a year from 1 to 9999")

    @property
    def quantity(self) -> int:
        return self.serial_end - self.serial_start + 1


def identifier_of(block: Block) -> BlockIdentifier:
    """The identifier of ``block`` (raises ValueError if the block cannot have one)."""
    return BlockIdentifier(
        unit_type=block.unit_type,
        cooperative_approach_id=block.cooperative_approach_id,
        originating_registry=block.originating_registry,
        first_transferring_party=block.first_transferring_party,
        serial_start=block.serial_start,
        serial_end=block.serial_end,
        vintage=block.vintage,
    )


def format_identifier(identifier: BlockIdentifier) -> str:
    """The one canonical text of ``identifier``."""
    fields = (
        UNIT_TYPE_TOKENS[identifier.unit_type],
        _encode(identifier.cooperative_approach_id),
        _encode(identifier.originating_registry),
        _encode(identifier.first_transferring_party),
        f"{identifier.serial_start}-{identifier.serial_end}",
        str(identifier.vintage),
    )
    return ":".join(fields)


def parse_identifier(text: str) -> BlockIdentifier:
    """Read a canonical identifier text; ValueError names what is wrong."""
    fields = text.split(":")
    if len(fields) != 6:
        raise ValueError(
            f"identifier {text!r} has {len(fields)} ':'-separated fields, expected 6: "
            "type:approach:registry:party:first-last:vintage"
        )
    token, approach, registry, party, serials, vintage = fields
    if token not in _TOKEN_TYPES:
        raise ValueError(
            f"identifier {text!r} has unit type {token!r}, expected one of "
            + ", ".join(sorted(_TOKEN_TYPES))
        )
    first, sep, last = serials.partition("-")
    if not sep:
        raise ValueError(f"identifier {text!r} has serials {serials!r}, expected first-last")
    try:
        identifier = BlockIdentifier(
            unit_type=_TOKEN_TYPES[token],
            cooperative_approach_id=_decode(approach, "cooperative approach", text),
            originating_registry=_decode(registry, "originating registry", text),
            first_transferring_party=_decode(party, "first transferring party", text),
            serial_start=_number(first, "first serial", text),
            serial_end=_number(last, "last serial", text),
            vintage=_number(vintage, "vintage", text),
        )
    except ValueError as exc:
        if str(exc).startswith("identifier "):
            raise
        raise ValueError(f"identifier {text!r}: {exc}") from None
    return identifier


def _encode(value: str) -> str:
    return urllib.parse.quote(value, safe=_SAFE, encoding="utf-8", errors="strict")


def _decode(field: str, what: str, text: str) -> str:
    try:
        value = urllib.parse.unquote(field, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"identifier {text!r}: {what} {field!r} is not UTF-8") from None
    if _encode(value) != field:
        raise ValueError(
            f"identifier {text!r}: {what} {field!r} is not canonically escaped "
            f"(expected {_encode(value)!r})"
        )
    return value


def _number(field: str, what: str, text: str) -> int:
    if not _NUMBER.fullmatch(field):
        raise ValueError(
            f"identifier {text!r}: {what} {field!r} is not a positive decimal number "
            "without leading zeros"
        )
    return int(field)
