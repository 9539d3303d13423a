-- itmolink schema version 6: revocations that cascade (PROTOCOL §3.8, §5.12 KR2, KR3).
-- partner_keys.announced_by: the key ids (space-separated) whose signatures were on the
-- KeyRotation that announced the key; NULL for a key announced before this version
-- (it cannot fall with the key that announced it). revoked_keys.compromised_since:
-- the instant (microseconds, as the revocation gave it) from which the key was compromised;
-- every key recorded at or after it as announced by that key is revoked with it.
-- NULL: a retirement, nothing cascades.
ALTER TABLE partner_keys ADD COLUMN announced_by TEXT;
ALTER TABLE revoked_keys ADD COLUMN compromised_since BIGINT;
