-- itmolink schema version 5 on PostgreSQL (see 0005_journal_rowid.sql): the id
-- stays the primary key; the unique constraint on entry_hash (and its index) goes.
ALTER TABLE journal DROP CONSTRAINT journal_entry_hash_key;
