-- itmolink schema version 8: the keys that signed a revocation giving a compromise
-- instant (PROTOCOL §3.8). revoked_keys.compromise_signed_by: the key ids
-- (space-separated) whose signatures were on the KeyRotation that gave the instant in
-- force; they do not fall with the revoked key (the owner signs its revocation with a
-- key it keeps). NULL: none (given by the operator, a card, or before this version).
ALTER TABLE revoked_keys ADD COLUMN compromise_signed_by TEXT;
