-- itmolink schema version 9: the one-round transfer (docs/DESIGN.md, "one-round
-- transfer"). transfers.complete_on_acceptance: 1 if the transfer's proposal asked
-- the receiver to complete on acceptance (TransferProposal.complete_on_acceptance),
-- as proposed (the sender) or as received (the receiver). A sender never voids such
-- a transfer on its time-out; it waits for an answer. 0 for every transfer before.
ALTER TABLE transfers ADD COLUMN complete_on_acceptance INTEGER NOT NULL DEFAULT 0;
