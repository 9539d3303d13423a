"""A partner card lists the keys its party revoked (PROTOCOL §2.4, §3.8)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from itmolink.crypto.keys import SigningKey
from itmolink.crypto.pki import PartnerCard, RevokedKey, init_party

NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture
def card(tmp_path: Path) -> Path:
    return init_party(tmp_path / "lao", "LAO", "LAO-NR", now=NOW).card


def test_a_revoked_key_moves_from_the_signing_keys_to_the_revoked_keys(card: Path) -> None:
    first = PartnerCard.load(card)
    extra = SigningKey.generate("LAO").verifying_key()
    with_two = PartnerCard(first.party, first.registry, first.ca_certificate_pem,
                           (*first.signing_keys, extra))  # fmt: skip
    since = NOW - dt.timedelta(days=2)
    revoked = with_two.revoking(extra.key_id, NOW, since)
    card.write_text(revoked.to_toml())
    loaded = PartnerCard.load(card)
    assert loaded.signing_keys == first.signing_keys
    assert loaded.revoked_keys == (RevokedKey(extra.key_id, NOW, since),)
    # Revoked again, as a retirement: the first date and the compromise instant stay;
    # an earlier compromise instant widens it.
    again = loaded.revoking(extra.key_id, NOW + dt.timedelta(days=1))
    assert again.revoked_keys == (RevokedKey(extra.key_id, NOW, since),)
    earlier = again.revoking(extra.key_id, NOW, since - dt.timedelta(days=1))
    assert earlier.revoked_keys[0].compromised_since == since - dt.timedelta(days=1)


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        ('key_id = "KOR-ed25519-0123456789abcdef"\nrevoked_at = 2026-03-01T00:00:00Z',
         "not a key id of LAO"),
        ('key_id = "LAO-ed25519-0123456789abcdef"', "revoked_at must be a TOML date-time"),
        ('key_id = "LAO-ed25519-0123456789abcdef"\nrevoked_at = 2026-03-01T00:00:00',
         "revoked_at must be a TOML date-time with an offset"),
        ('key_id = "LAO-ed25519-0123456789abcdef"\nrevoked_at = 2026-03-01T00:00:00Z\n'
         'compromised_since = "yesterday"', "compromised_since must be"),
        ('revoked_at = 2026-03-01T00:00:00Z', "missing field 'key_id'"),
    ],
    ids=["other-party", "no-date", "local-date", "string-date", "no-key-id"],
)  # fmt: skip
def test_a_card_with_a_bad_revoked_key_entry_is_refused(card: Path, entry: str, error: str) -> None:
    card.write_text(card.read_text() + f"\n[[revoked_keys]]\n{entry}\n")
    with pytest.raises(ValueError, match=error):
        PartnerCard.load(card)
