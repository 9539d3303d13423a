"""Field validation of a verified payload, before any rule looks at it.

Applied only after the envelope's signature verified and the payload parsed:
unauthenticated bytes are never inspected further. The rules are generic over
every message of the protocol, so a new field is covered without a new rule:
text is bounded and free of control characters, party codes are ISO 3166-1
alpha-3, integers fit the signed 64-bit columns of the ledger, timestamps are
in the range google.protobuf.Timestamp defines, and repeated fields are
bounded (blocks by the node's configured limit).
"""

from __future__ import annotations

import re

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

from itmolink.core.codes import Rejected, RejectionCode

MAX_TEXT = 256
MAX_PROSE = 4096
MAX_REPEATED = 10_000
MAX_INT = 2**63 - 1
PROSE_FIELDS = frozenset({"description", "detail", "reason", "oimp_detail", "name"})
PARTY_FIELDS = frozenset(
    {"sender_party", "audience", "host_party", "first_transferring_party", "acquiring_parties"}
)
_PARTY = re.compile(r"[A-Z]{3}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_UNSIGNED = (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64)


def validate(msg: Message, *, max_blocks: int, path: str = "") -> None:
    """Raise INVALID_FIELD (or TOO_MANY_BLOCKS) for the first field out of bounds."""
    for field, value in msg.ListFields():
        where = f"{path}{field.name}"
        repeated = _is_repeated(field)
        values = list(value) if repeated else [value]
        if repeated:
            limit = max_blocks if field.name == "blocks" else MAX_REPEATED
            if len(values) > limit:
                code = (
                    RejectionCode.TOO_MANY_BLOCKS
                    if field.name == "blocks"
                    else RejectionCode.INVALID_FIELD
                )
                raise Rejected(code, f"{where} has {len(values)} entries; at most {limit}")
        for item in values:
            if field.type == FieldDescriptor.TYPE_MESSAGE and isinstance(item, Timestamp):
                _timestamp(where, item)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                validate(item, max_blocks=max_blocks, path=f"{where}.")
            elif field.type == FieldDescriptor.TYPE_STRING:
                _text(where, field.name, item)
            elif field.type in _UNSIGNED and item > MAX_INT:
                raise Rejected(RejectionCode.INVALID_FIELD, f"{where} = {item} is above {MAX_INT}")


# The range of google.protobuf.Timestamp: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


def _timestamp(where: str, value: Timestamp) -> None:
    if not _MIN_SECONDS <= value.seconds <= _MAX_SECONDS or not 0 <= value.nanos < 10**9:
        raise Rejected(
            RejectionCode.INVALID_FIELD,
            f"{where} is not a valid timestamp (seconds {value.seconds}, nanos {value.nanos})",
        )


def _text(where: str, name: str, value: str) -> None:
    limit = MAX_PROSE if name in PROSE_FIELDS else MAX_TEXT
    if len(value) > limit:
        raise Rejected(
            RejectionCode.INVALID_FIELD, f"{where} has {len(value)} characters; at most {limit}"
        )
    if _CONTROL.search(value):
        raise Rejected(RejectionCode.INVALID_FIELD, f"{where} contains a control character")
    if name in PARTY_FIELDS and not _PARTY.fullmatch(value):
        raise Rejected(
            RejectionCode.INVALID_FIELD, f"{where} = {value!r} is not an ISO 3166-1 alpha-3 code"
        )


def _is_repeated(field: FieldDescriptor) -> bool:
    # protobuf 7 has is_repeated; older runtimes only the label.
    if hasattr(field, "is_repeated"):
        return bool(field.is_repeated)
    return bool(getattr(field, "label", 0) == 3)  # LABEL_REPEATED
