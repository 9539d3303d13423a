-- The operators' audit trail becomes a hash chain, like the journal (see
-- core/journal.py). Rows written before this migration keep NULL hashes and
-- are reported as unchained by 'itmolink audit verify'; the chain starts at
-- the first row written after it, from the genesis hash. Its head is kept in
-- meta under 'admin_audit_head'.
ALTER TABLE admin_audit ADD COLUMN prev_hash BYTEA_OR_BLOB;
ALTER TABLE admin_audit ADD COLUMN entry_hash BYTEA_OR_BLOB;
