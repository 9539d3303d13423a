"""Field validation of a verified payload, before any rule looks at it.

The rules live in the proto files, as ``(itmolink.v1.rules)`` field options
(proto/itmolink/v1/rules.proto), so a partner implementing the protocol reads
the same constraints this node enforces. On top of them, every field of every
message gets generic bounds: text at most 256 characters (4,096 for prose
fields) and free of control characters, integers that fit the ledger's signed
64-bit columns, timestamps within google.protobuf.Timestamp's range, and at
most 10,000 entries in a repeated field (blocks: the node's configured limit).

Applied only after the envelope's signature verified and the payload parsed:
unauthenticated bytes are never inspected further.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from itmolink.core.codes import Rejected, RejectionCode
from itmolink.v1 import rules_pb2

MAX_TEXT = 256
MAX_PROSE = 4096
MAX_REPEATED = 10_000
MAX_INT = 2**63 - 1
PROSE_FIELDS = frozenset({"description", "detail", "reason", "oimp_detail", "name"})
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNSIGNED = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)
_INTEGERS = (
    FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_INT32,
    FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_ENUM,
)  # fmt: skip
# The range of google.protobuf.Timestamp: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def _invalid(detail: str) -> Rejected:
    return Rejected(RejectionCode.INVALID_FIELD, detail)


@functools.cache
def _rules(descriptor: Descriptor) -> tuple[tuple[FieldDescriptor, rules_pb2.FieldRules], ...]:
    """Each field of a message with the rules its proto declares (possibly none)."""
    found = []
    for field in descriptor.fields:
        options = field.GetOptions()
        rules = (
            options.Extensions[rules_pb2.rules]
            if options.HasExtension(rules_pb2.rules)
            else rules_pb2.FieldRules()
        )
        found.append((field, rules))
    return tuple(found)


# What a value of a field is checked as.
_TIMESTAMP, _MESSAGE, _TEXT, _INTEGER, _UNCHECKED = range(5)


@dataclass(frozen=True, slots=True)
class _Plan:
    """One field's rules, read once from its descriptor (reading them from the
    protobuf options on every message cost more than the checks themselves)."""

    name: str
    repeated: bool
    blocks: bool  # "blocks": bounded by the node's configured limit too
    has_field: bool  # presence is HasField (a message), not a non-empty value
    required: bool
    max_items: int
    kind: int
    max_len: int
    pattern: re.Pattern[str] | None
    pattern_text: str
    unsigned: bool
    min: int
    max: int


@functools.cache
def _plan(descriptor: Descriptor) -> tuple[_Plan, ...]:
    plans = []
    for field, rules in _rules(descriptor):
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            message = field.message_type
            timestamp = message is not None and message.full_name == Timestamp.DESCRIPTOR.full_name
            kind = _TIMESTAMP if timestamp else _MESSAGE
        elif field.type == FieldDescriptor.TYPE_STRING:
            kind = _TEXT
        elif field.type in _INTEGERS:
            kind = _INTEGER
        else:
            kind = _UNCHECKED
        plans.append(
            _Plan(
                name=field.name,
                repeated=_is_repeated(field),
                blocks=field.name == "blocks",
                has_field=field.type == FieldDescriptor.TYPE_MESSAGE,
                required=rules.required,
                max_items=rules.max_items or MAX_REPEATED,
                kind=kind,
                max_len=rules.max_len or (MAX_PROSE if field.name in PROSE_FIELDS else MAX_TEXT),
                pattern=re.compile(rules.pattern) if rules.pattern else None,
                pattern_text=rules.pattern,
                unsigned=field.type in _UNSIGNED,
                min=rules.min,
                max=rules.max,
            )
        )
    return tuple(plans)


def validate(msg: Message, *, max_blocks: int, path: str = "") -> None:
    """Raise MISSING_FIELD for a required field left empty, INVALID_FIELD (or
    TOO_MANY_BLOCKS, or TOO_MANY_ITEMS for a batch's transfers) for the first field
    out of bounds."""
    for plan in _plan(msg.DESCRIPTOR):
        value = getattr(msg, plan.name)
        if plan.repeated:
            count = len(value)
            if plan.blocks and count > max_blocks:
                raise Rejected(
                    RejectionCode.TOO_MANY_BLOCKS,
                    f"{path}{plan.name} has {count} entries; at most {max_blocks}",
                )
            if count > plan.max_items:
                if plan.name == "items":  # the transfers of a batch (§5.15)
                    raise Rejected(
                        RejectionCode.TOO_MANY_ITEMS,
                        f"{path}{plan.name} has {count} transfers; at most {plan.max_items} in "
                        "one batch",
                    )
                raise _invalid(f"{path}{plan.name} has {count} entries; at most {plan.max_items}")
            if plan.required and not count:
                raise Rejected(
                    RejectionCode.MISSING_FIELD, f"{path}{plan.name} needs at least one entry"
                )
            if plan.kind == _UNCHECKED:
                continue
            for item in value:
                _check(path, plan, item, max_blocks)
        else:
            present = msg.HasField(plan.name) if plan.has_field else bool(value)
            if not present:
                if plan.required:
                    raise Rejected(RejectionCode.MISSING_FIELD, f"{path}{plan.name} is required")
                continue
            if plan.kind != _UNCHECKED:
                _check(path, plan, value, max_blocks)


def _check(path: str, plan: _Plan, item: Any, max_blocks: int) -> None:
    kind = plan.kind
    if kind == _TEXT:
        if len(item) > plan.max_len:
            raise _invalid(f"{path}{plan.name} has {len(item)} characters; at most {plan.max_len}")
        if _CONTROL.search(item):
            raise _invalid(f"{path}{plan.name} contains a control character")
        if plan.pattern is not None and not plan.pattern.fullmatch(item):
            raise _invalid(f"{path}{plan.name} = {item!r} does not match {plan.pattern_text}")
    elif kind == _MESSAGE:
        validate(item, max_blocks=max_blocks, path=f"{path}{plan.name}.")
    elif kind == _INTEGER:
        if plan.unsigned and item > MAX_INT:
            raise _invalid(f"{path}{plan.name} = {item} is above {MAX_INT}")
        if plan.min and item < plan.min:  # 0: no bound
            raise _invalid(f"{path}{plan.name} = {item} is below {plan.min}")
        if plan.max and item > plan.max:
            raise _invalid(f"{path}{plan.name} = {item} is above {plan.max}")
    elif kind == _TIMESTAMP and (
        not _MIN_SECONDS <= item.seconds <= _MAX_SECONDS or not 0 <= item.nanos < 10**9
    ):
        raise _invalid(
            f"{path}{plan.name} is not a valid timestamp "
            f"(seconds {item.seconds}, nanos {item.nanos})"
        )


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf 7 has is_repeated; older runtimes only the label.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(getattr(field, "label", 0) == 3)  # LABEL_REPEATED
