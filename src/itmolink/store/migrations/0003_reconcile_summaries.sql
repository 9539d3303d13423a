-- itmolink schema version 3: running sums for reconciliation (issue #9).
-- A reconciliation compares the top of the tree of transfer leaves and the
-- totals first (core/reconcile.py). Summing them over every final transfer at
-- each query costs a scan of the whole ledger; these tables keep the sums as
-- transfers become final (Tx._seal_transfer), and a query subtracts the few
-- transfers proposed at or after its snapshot (found by transfers_proposed).

-- Per partner and first three hex digits of id_hash: the leaf count and the sums
-- of the leaves' 31-bit slices, for both views.
CREATE TABLE reconcile_buckets (
    partner TEXT NOT NULL,
    prefix TEXT NOT NULL,
    leaves BIGINT NOT NULL,
    blocks_h1 BIGINT NOT NULL,
    blocks_h2 BIGINT NOT NULL,
    journal_h1 BIGINT NOT NULL,
    journal_h2 BIGINT NOT NULL,
    PRIMARY KEY (partner, prefix)
);

-- Per partner, direction and (unit type, vintage, authorisation): the tCO2e
-- moved by completed transfers and how many transfers moved them.
CREATE TABLE reconcile_totals (
    partner TEXT NOT NULL,
    direction TEXT NOT NULL,
    unit_type INTEGER NOT NULL,
    vintage INTEGER NOT NULL,
    authorisation_id TEXT NOT NULL,
    quantity BIGINT NOT NULL,
    transfers BIGINT NOT NULL,
    PRIMARY KEY (partner, direction, unit_type, vintage, authorisation_id)
);

CREATE INDEX transfers_proposed ON transfers (partner, proposed_at);

INSERT INTO reconcile_buckets (partner, prefix, leaves, blocks_h1, blocks_h2, journal_h1,
                               journal_h2)
SELECT partner, substr(id_hash, 1, 3), COUNT(*), SUM(blocks_h1), SUM(blocks_h2),
       SUM(journal_h1), SUM(journal_h2)
FROM transfers WHERE blocks_leaf IS NOT NULL
GROUP BY partner, substr(id_hash, 1, 3);

INSERT INTO reconcile_totals (partner, direction, unit_type, vintage, authorisation_id,
                              quantity, transfers)
SELECT t.partner, t.direction, b.unit_type, b.vintage, b.authorisation_id,
       SUM(b.serial_end - b.serial_start + 1), COUNT(DISTINCT t.transfer_id)
FROM transfers t JOIN transfer_blocks b ON b.transfer_id = t.transfer_id
WHERE t.state = 3 AND t.blocks_leaf IS NOT NULL
GROUP BY t.partner, t.direction, b.unit_type, b.vintage, b.authorisation_id;
