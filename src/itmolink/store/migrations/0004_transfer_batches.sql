-- itmolink schema version 4: batched transfers (docs/PROTOCOL.md §5.15).
-- A transfer proposed in a TransferBatchProposal names its batch; every other
-- column keeps its meaning (the digests are the batch's proposal and acceptance
-- digests). Empty for a transfer proposed on its own.
ALTER TABLE transfers ADD COLUMN batch_id TEXT NOT NULL DEFAULT '';
CREATE INDEX transfers_batch ON transfers (batch_id);
