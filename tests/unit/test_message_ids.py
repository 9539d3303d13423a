"""Message ids: random version-4 UUIDs in canonical lower-case text (PROTOCOL.md §4.2)."""

from __future__ import annotations

import uuid

from itmolink.node.base import random_uuid


def test_message_ids_are_canonical_random_version_4_uuids() -> None:
    ids = [random_uuid() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
        assert str(parsed) == text  # canonical: lower case, hyphens at 8-4-4-4-12
    # Every bit outside the version and variant varies.
    seen_or = seen_and = uuid.UUID(ids[0]).int
    for text in ids:
        seen_or |= uuid.UUID(text).int
        seen_and &= uuid.UUID(text).int
    fixed = seen_and | (~seen_or & (2**128 - 1))
    assert fixed == (0xF << 76) | (0x3 << 62)  # the version nibble and the variant bits
