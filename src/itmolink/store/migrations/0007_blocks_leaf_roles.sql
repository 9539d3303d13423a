-- itmolink schema version 7: the blocks leaf states each party's corresponding
-- adjustments for the transfer (docs/PROTOCOL.md §11.4, docs/DESIGN.md decision 46).
-- The leaf of every completed transfer changes; a leaf is a SHA-256 digest that the
-- databases do not compute alike, so this migration only lists the completed
-- transfers sealed under the old definition. The store seals each one again, in
-- Python, when it opens the database (Tx.reseal_listed_transfers: the new leaf and its
-- share of the running sums, and the transfer leaves the list in the same
-- transaction), so an interrupted upgrade resumes where it stopped. Transfers that
-- moved nothing keep their leaves, and the journal leaves do not change.
CREATE TABLE leaves_to_reseal (
    transfer_id TEXT PRIMARY KEY
);

INSERT INTO leaves_to_reseal (transfer_id)
SELECT transfer_id FROM transfers WHERE state = 3 AND blocks_leaf IS NOT NULL;
