"""The journal's hash chain finds an edited, removed, inserted or reordered entry."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

import pytest

from itmolink.core.journal import (
    GENESIS_HASH,
    AuditEntry,
    JournalEntry,
    audit_hash,
    entry_hash,
    link_hash,
    verify_chain,
)


def chain(count: int) -> list[JournalEntry]:
    entries: list[JournalEntry] = []
    prev = GENESIS_HASH
    for i in range(1, count + 1):
        fields = dict(
            id=i,
            direction="in" if i % 2 else "out",
            partner="KOR",
            message_id=f"m{i}",
            payload_type="itmolink.v1.TransferProposal",
            recorded_at=1_000 * i,
            envelope=f"envelope {i}".encode(),
        )
        digest = entry_hash(prev, **fields)  # type: ignore[arg-type]
        entries.append(JournalEntry(**fields, prev_hash=prev, entry_hash=digest))  # type: ignore[arg-type]
        prev = digest
    return entries


def head(entries: list[JournalEntry]) -> tuple[int, bytes]:
    return entries[-1].id, entries[-1].entry_hash


def test_an_intact_chain_has_no_problem() -> None:
    entries = chain(5)
    assert verify_chain(entries, recorded_head=head(entries)) == []
    assert verify_chain([], recorded_head=None) == []


@pytest.mark.parametrize(
    "field",
    ["direction", "partner", "message_id", "payload_type", "recorded_at", "envelope"],
)
def test_an_edited_field_is_found(field: str) -> None:
    entries = chain(5)
    value = getattr(entries[2], field)
    edited = value + 1 if isinstance(value, int) else value + value[:1]
    changes: dict[str, Any] = {field: edited}  # one field, named at run time
    entries[2] = replace(entries[2], **changes)
    problems = verify_chain(entries, recorded_head=head(chain(5)))
    assert [p.entry_id for p in problems] == [3]
    assert "edited" in problems[0].problem


def test_an_edit_that_recomputes_its_own_hash_breaks_the_next_link() -> None:
    entries = chain(5)
    forged = replace(entries[2], envelope=b"forged")
    entries[2] = replace(forged, entry_hash=entry_hash(
        forged.prev_hash, id=3, direction=forged.direction, partner=forged.partner,
        message_id=forged.message_id, payload_type=forged.payload_type,
        recorded_at=forged.recorded_at, envelope=forged.envelope,
    ))  # fmt: skip
    assert [p.entry_id for p in verify_chain(entries)] == [4]


def test_a_removed_entry_is_found() -> None:
    entries = chain(5)
    del entries[1]
    assert {p.entry_id for p in verify_chain(entries)} == {3}


def test_an_inserted_entry_is_found() -> None:
    entries = chain(5)
    entries.insert(2, replace(entries[1], message_id="injected"))
    assert verify_chain(entries) != []


def test_reordered_entries_are_found() -> None:
    entries = chain(5)
    entries[1], entries[2] = entries[2], entries[1]
    assert {p.entry_id for p in verify_chain(entries)} >= {2, 3}


def test_entries_removed_from_the_end_are_found_against_the_recorded_head() -> None:
    entries = chain(5)
    recorded = head(entries)
    assert verify_chain(entries[:3]) == []  # the chain alone cannot tell
    problems = verify_chain(entries[:3], recorded_head=recorded)
    assert [p.entry_id for p in problems] == [5]


def audit_chain(n: int) -> list[AuditEntry]:
    entries: list[AuditEntry] = []
    prev = GENESIS_HASH
    for i in range(1, n + 1):
        fields = {
            "id": i, "operator": "admin", "method": "Issue", "request": f"quantity={i}",
            "outcome": "started" if i % 2 else "ok", "recorded_at": 1_700_000_000_000_000 + i,
        }  # fmt: skip
        digest = audit_hash(prev, **fields)  # type: ignore[arg-type]
        entries.append(AuditEntry(**fields, prev_hash=prev, entry_hash=digest))  # type: ignore[arg-type]
        prev = digest
    return entries


def test_the_audit_trail_is_chained_like_the_journal() -> None:
    entries = audit_chain(6)
    assert verify_chain(entries, recorded_head=(6, entries[-1].entry_hash)) == []
    edited = list(entries)
    edited[3] = replace(edited[3], outcome="ok, says nobody")
    assert [p.entry_id for p in verify_chain(edited)] == [4]
    # The hash covers every field, so another field's value gives another hash.
    assert replace(entries[0], operator="alice").computed_hash() != entries[0].entry_hash
    # A chain that starts after older, unchained rows.
    shifted = [
        replace(e, id=e.id + 3) for e in entries
    ]  # ids shift, so each hash no longer matches
    assert verify_chain(shifted, first_id=4) != []
    assert verify_chain(entries, first_id=4)[0].problem.startswith("entry 4 expected here")


def test_an_entry_hash_is_the_documented_encoding() -> None:
    """SHA-256(prev_hash || F(id) || F(direction) || ... || F(envelope)), each field
    its 8-byte big-endian length then its bytes (integers as 8 bytes): journals
    written before stay verifiable however the hash is computed."""

    def field(value: bytes) -> bytes:
        return len(value).to_bytes(8, "big") + value

    prev = bytes(range(32))
    expected = hashlib.sha256(
        prev
        + field((7).to_bytes(8, "big", signed=True))
        + field(b"out")
        + field(b"KOR")
        + field(b"m-7")
        + field(b"itmolink.v1.TransferAcceptance")
        + field((-5).to_bytes(8, "big", signed=True))
        + field(b"\x00envelope")
    ).digest()
    assert expected == entry_hash(
        prev, id=7, direction="out", partner="KOR", message_id="m-7",
        payload_type="itmolink.v1.TransferAcceptance", recorded_at=-5, envelope=b"\x00envelope",
    )  # fmt: skip


def test_the_journal_hash_matches_the_generic_chain_hash() -> None:
    """entry_hash is link_hash over its seven fields (spelt out for speed)."""
    cases = [("", b"", 2**63 - 1, -(2**63)), ("é-ü", b"\x00" * 300, 0, 0), ("x", b"y", 1, -1)]
    for text, envelope, id_, recorded_at in cases:
        prev = hashlib.sha256(text.encode()).digest()
        generic = link_hash(
            prev,
            (
                id_.to_bytes(8, "big", signed=True), b"in", text.encode(), f"m{text}".encode(),
                (text * 3).encode(), recorded_at.to_bytes(8, "big", signed=True), envelope,
            ),
        )  # fmt: skip
        assert generic == entry_hash(
            prev, id=id_, direction="in", partner=text, message_id=f"m{text}",
            payload_type=text * 3, recorded_at=recorded_at, envelope=envelope,
        )  # fmt: skip
