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


# How a field is checked (see _plan).
_REPEATED, _MESSAGE, _SCALAR = 0, 1, 2


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


@functools.cache
def _plan(
    descriptor: Descriptor,
) -> tuple[tuple[str, int, bool, FieldDescriptor, rules_pb2.FieldRules], ...]:
    """Each field of a message as (name, how it is checked, whether it holds
    messages other than timestamps, field, rules), worked out once per message type."""
    return tuple(
        (
            field.name,
            _REPEATED
            if _is_repeated(field)
            else _MESSAGE
            if field.type == FieldDescriptor.TYPE_MESSAGE
            else _SCALAR,
            field.type == FieldDescriptor.TYPE_MESSAGE
            and field.message_type is not None
            and field.message_type.full_name != Timestamp.DESCRIPTOR.full_name,
            field,
            rules,
        )
        for field, rules in _rules(descriptor)
    )


def validate(msg: Message, *, max_blocks: int, path: str = "") -> None:
    """Raise MISSING_FIELD for a required field left empty, INVALID_FIELD (or
    TOO_MANY_BLOCKS, or TOO_MANY_ITEMS for a batch's transfers) for the first field
    out of bounds."""
    for name, how, holds_messages, field, rules in _plan(msg.DESCRIPTOR):
        value = getattr(msg, name)
        if how == _REPEATED:
            count = len(value)
            if name == "blocks" and count > max_blocks:
                raise Rejected(
                    RejectionCode.TOO_MANY_BLOCKS,
                    f"{path}{name} has {count} entries; at most {max_blocks}",
                )
            limit = rules.max_items or MAX_REPEATED
            if count > limit:
                if name == "items":  # the transfers of a batch (§5.15)
                    raise Rejected(
                        RejectionCode.TOO_MANY_ITEMS,
                        f"{path}{name} has {count} transfers; at most {limit} in one batch",
                    )
                raise _invalid(f"{path}{name} has {count} entries; at most {limit}")
            if not count:
                if rules.required:
                    raise Rejected(
                        RejectionCode.MISSING_FIELD, f"{path}{name} needs at least one entry"
                    )
                continue
            if holds_messages:
                inner = f"{path}{name}."
                for item in value:
                    validate(item, max_blocks=max_blocks, path=inner)
                continue
            values = value
        elif how == _MESSAGE:
            if not msg.HasField(name):
                if rules.required:
                    raise Rejected(RejectionCode.MISSING_FIELD, f"{path}{name} is required")
                continue
            values = (value,)
        else:
            if not value:
                if rules.required:
                    raise Rejected(RejectionCode.MISSING_FIELD, f"{path}{name} is required")
                continue
            values = (value,)
        for item in values:
            _check(path, name, field, rules, item, max_blocks)


def _check(
    path: str,
    name: str,
    field: FieldDescriptor,
    rules: rules_pb2.FieldRules,
    item: object,
    max_blocks: int,
) -> None:
    if isinstance(item, str):
        limit = rules.max_len or (MAX_PROSE if name in PROSE_FIELDS else MAX_TEXT)
        if len(item) > limit:
            raise _invalid(f"{path}{name} has {len(item)} characters; at most {limit}")
        if _CONTROL.search(item):
            raise _invalid(f"{path}{name} contains a control character")
        if rules.pattern and not re.fullmatch(rules.pattern, item):
            raise _invalid(f"{path}{name} = {item!r} does not match {rules.pattern}")
    elif isinstance(item, int) and field.type in _INTEGERS:
        if field.type in _UNSIGNED and item > MAX_INT:
            raise _invalid(f"{path}{name} = {item} is above {MAX_INT}")
        if rules.min and item < rules.min:  # 0: no bound
            raise _invalid(f"{path}{name} = {item} is below {rules.min}")
        if rules.max and item > rules.max:
            raise _invalid(f"{path}{name} = {item} is above {rules.max}")
    elif isinstance(item, Timestamp):
        if not _MIN_SECONDS <= item.seconds <= _MAX_SECONDS or not 0 <= item.nanos < 10**9:
            raise _invalid(
                f"{path}{name} is not a valid timestamp (seconds {item.seconds}, nanos "
                f"{item.nanos})"
            )
    elif isinstance(item, Message):
        validate(item, max_blocks=max_blocks, path=f"{path}{name}.")


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf 7 has is_repeated; older runtimes only the label.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(getattr(field, "label", 0) == 3)  # LABEL_REPEATED
