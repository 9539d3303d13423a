-- itmolink schema version 10: the completion that completed each incoming transfer
-- (PROTOCOL §5.11 records, §7.9 recovery). transfer_completions: for a transfer this
-- node received and completed on a TransferCompletion or TransferBatchCompletion, the
-- journal entry of that completion, so that it can be given back to its sender as the
-- sender's proof that it completed. None for transfers completed before this version
-- (the completion is then found through the adjustment that cites it, if any).
CREATE TABLE transfer_completions (
    transfer_id TEXT PRIMARY KEY REFERENCES transfers (transfer_id),
    journal_id BIGINT NOT NULL REFERENCES journal (id)
);
