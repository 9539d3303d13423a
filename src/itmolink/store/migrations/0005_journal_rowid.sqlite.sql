-- itmolink schema version 5 on SQLite (see 0005_journal_rowid.sql): the journal is
-- rebuilt with id as its INTEGER PRIMARY KEY (the row id) and no index on
-- entry_hash, following SQLite's procedure for changing a table's definition:
-- foreign keys are off during the migration (store/sqlite.py), the new table is
-- filled, the old one dropped, the new one renamed, and the foreign keys of the
-- tables that refer to the journal are checked before the commit. Every row is
-- copied as it was: a large ledger takes a while, once.
CREATE TABLE journal_v5 (
    id INTEGER PRIMARY KEY,
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    partner TEXT NOT NULL,
    message_id TEXT NOT NULL,
    payload_type TEXT NOT NULL,
    envelope BYTEA_OR_BLOB NOT NULL,
    recorded_at BIGINT NOT NULL,
    prev_hash BYTEA_OR_BLOB NOT NULL,
    entry_hash BYTEA_OR_BLOB NOT NULL
);
INSERT INTO journal_v5 (id, direction, partner, message_id, payload_type, envelope,
                        recorded_at, prev_hash, entry_hash)
SELECT id, direction, partner, message_id, payload_type, envelope, recorded_at, prev_hash,
       entry_hash
FROM journal ORDER BY id;
DROP TABLE journal;
ALTER TABLE journal_v5 RENAME TO journal;
CREATE UNIQUE INDEX journal_message ON journal (direction, partner, message_id);
