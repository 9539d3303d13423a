"""The worked example of docs/PROTOCOL.md §11.6 is what core/reconcile.py computes:
the encoded blocks leaf byte for byte, every leaf digest, its slices and the bucket
sums of the example's answers (the document's test vectors for §11.4 and §11.5)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from itmolink.core import reconcile
from itmolink.core.blocks import Block
from itmolink.core.reconcile import TransferFacts, blocks_leaf, id_hash, journal_leaf, slices
from itmolink.core.units import UnitType

ROOT = Path(__file__).resolve().parents[2]

A = TransferFacts(
    transfer_id="LAO-T-000001", sender="LAO", receiver="KOR", moved=True,
    blocks=(Block("LAO-NR", 1, 10, UnitType.ITMO, 2025, "LAO-SOLAR-WIND-1GW", "LAO-A-0001",
                  "LAO-KOR-A6.2", "LAO"),),
    sender_adjustments=((2025, 10),), receiver_adjustments=((2025, -10),),
    proposal_digest=b"\x11" * 32, acceptance_digest=b"\x22" * 32,
)  # fmt: skip
B = TransferFacts(
    transfer_id="LAO-T-000087", sender="LAO", receiver="KOR", moved=False, blocks=(),
    sender_adjustments=(), receiver_adjustments=(), proposal_digest=b"\x33" * 32,
    acceptance_digest=b"",
)  # fmt: skip


def example() -> str:
    text = (ROOT / "docs" / "PROTOCOL.md").read_text()
    return text[text.index("### 11.6 Worked example") : text.index("### 11.7 Requester")]


def dumped(section: str, caption: str) -> bytes:
    """The bytes of the hex dump that follows ``caption``."""
    block = section[section.index(caption) :].split("```")[1]
    data = bytearray()
    for line in block.strip().splitlines():
        data += bytes.fromhex(line[6:53])
    return bytes(data)


def test_the_encoded_blocks_leaves_are_the_documented_bytes() -> None:
    section = example()
    block = A.blocks[0]
    encoded = reconcile._encode(
        A.transfer_id, A.sender, A.receiver, "moved", block.originating_registry,
        block.serial_start, block.serial_end, int(block.unit_type), block.vintage,
        block.authorisation_id, block.activity_id, block.cooperative_approach_id,
        block.first_transferring_party, "sender", 2025, 10, "receiver", 2025, -10,
    )  # fmt: skip
    assert hashlib.sha256(encoded).digest() == blocks_leaf(A)
    assert dumped(section, f"A's blocks leaf ({len(encoded)} bytes)") == encoded
    b_encoded = reconcile._encode(B.transfer_id, B.sender, B.receiver, "not moved")
    assert hashlib.sha256(b_encoded).digest() == blocks_leaf(B)
    assert dumped(section, f"B's blocks leaf ({len(b_encoded)} bytes)") == b_encoded


def test_the_documented_digests_slices_and_sums_are_computed() -> None:
    section = example()
    for facts in (A, B):
        assert id_hash(facts.transfer_id) in section
        for leaf in (blocks_leaf(facts), journal_leaf(facts)):
            assert leaf.hex() in section
            assert "slices ({}, {})".format(*slices(leaf)) in section
    for view, leaf_of in (("BLOCKS", blocks_leaf), ("JOURNAL", journal_leaf)):
        (a1, a2), (b1, b2) = slices(leaf_of(A)), slices(leaf_of(B))
        row = re.search(
            rf'`{view}`, `prefixes \[""\]` \| `\{{prefix "0", count 2, h1 (\d+), h2 (\d+)\}}`',
            section,
        )
        assert row is not None
        assert (int(row.group(1)), int(row.group(2))) == (a1 + b1, a2 + b2)
    assert f"{{LAO-T-000001, {blocks_leaf(A).hex()[:8]}...}}" in section
