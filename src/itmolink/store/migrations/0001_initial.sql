-- itmolink schema version 1. Portable SQL: SQLite and PostgreSQL.
-- Times are integer microseconds since the Unix epoch (UTC). BYTEA_OR_BLOB and
-- AUTO_ID are replaced per database by store/migrate.py.

CREATE TABLE node_meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE counters (
    name TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);

-- Per-partner link state: the next sequence number this node sends.
CREATE TABLE links (
    partner TEXT PRIMARY KEY,
    next_out_sequence BIGINT NOT NULL
);

-- Every envelope sent or received, raw bytes, in a hash chain: the evidence.
CREATE TABLE journal (
    id BIGINT PRIMARY KEY,
    direction TEXT NOT NULL CHECK (direction IN ('in', 'out')),
    partner TEXT NOT NULL,
    message_id TEXT NOT NULL,
    payload_type TEXT NOT NULL,
    envelope BYTEA_OR_BLOB NOT NULL,
    recorded_at BIGINT NOT NULL,
    prev_hash BYTEA_OR_BLOB NOT NULL,
    entry_hash BYTEA_OR_BLOB NOT NULL UNIQUE
);
CREATE UNIQUE INDEX journal_message ON journal (direction, partner, message_id);

-- Requests received: each message id is applied at most once; a retry gets
-- the stored reply.
CREATE TABLE inbox (
    partner TEXT NOT NULL,
    message_id TEXT NOT NULL,
    payload_digest BYTEA_OR_BLOB NOT NULL,
    sequence BIGINT NOT NULL,
    reply BYTEA_OR_BLOB NOT NULL,
    journal_id BIGINT NOT NULL REFERENCES journal (id),
    PRIMARY KEY (partner, message_id)
);
CREATE UNIQUE INDEX inbox_sequence ON inbox (partner, sequence);

-- Requests to send: persisted before sending, retried until answered.
CREATE TABLE outbox (
    message_id TEXT PRIMARY KEY,
    partner TEXT NOT NULL,
    payload_type TEXT NOT NULL,
    subject_id TEXT NOT NULL,
    envelope BYTEA_OR_BLOB NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'answered', 'cancelled')),
    attempts INTEGER NOT NULL,
    next_attempt_at BIGINT NOT NULL,
    last_error TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    answered_journal_id BIGINT REFERENCES journal (id)
);
CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX outbox_subject ON outbox (payload_type, subject_id, created_at);

CREATE TABLE authorisations (
    host_party TEXT NOT NULL,
    authorisation_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    activity_id TEXT NOT NULL,
    activity_name TEXT NOT NULL,
    activity_description TEXT NOT NULL,
    cooperative_approach_id TEXT NOT NULL,
    acquiring_parties TEXT NOT NULL,
    purposes TEXT NOT NULL,
    oimp_detail TEXT NOT NULL,
    first_transfer_definition INTEGER NOT NULL,
    vintage_from INTEGER NOT NULL,
    vintage_to INTEGER NOT NULL,
    quantity_cap BIGINT NOT NULL,
    unit_type INTEGER NOT NULL,
    -- Per cooperative approach, in basis points: the buyer's share of each
    -- issuance (JCM-style) and a voluntary cancellation for OMGE.
    buyer_share_bp INTEGER NOT NULL DEFAULT 0,
    voluntary_omge_bp INTEGER NOT NULL DEFAULT 0,
    -- A revocation is recorded as a new version with this set.
    revoked INTEGER NOT NULL DEFAULT 0,
    -- For an authorisation received from its host: the journal entry of the
    -- signed statement, handed on as evidence with onward transfers.
    statement_journal_id BIGINT REFERENCES journal (id),
    created_at BIGINT NOT NULL,
    PRIMARY KEY (host_party, authorisation_id, version)
);

-- Per acquiring party: whether it acknowledged the authorisation.
CREATE TABLE authorisation_parties (
    host_party TEXT NOT NULL,
    authorisation_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    party TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'acknowledged', 'rejected')),
    rejection_code INTEGER NOT NULL,
    evidence_journal_id BIGINT REFERENCES journal (id),
    -- The acquiring party's own authorisation reference, from its acknowledgement.
    reference TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (host_party, authorisation_id, version, party)
);

CREATE TABLE issuances (
    host_party TEXT NOT NULL,
    issuance_id TEXT NOT NULL,
    authorisation_id TEXT NOT NULL,
    vintage INTEGER NOT NULL,
    quantity BIGINT NOT NULL,
    originating_registry TEXT NOT NULL,
    serial_start BIGINT NOT NULL,
    serial_end BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (host_party, issuance_id, originating_registry, serial_start)
);

-- Accounts of this registry. Every node has a holding account ('holding').
CREATE TABLE accounts (
    account_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (
        kind IN ('holding', 'adaptation-fund', 'cancellation', 'retirement', 'revoked')
    ),
    created_at BIGINT NOT NULL
);

-- Serial blocks held by this registry.
CREATE TABLE blocks (
    originating_registry TEXT NOT NULL,
    serial_start BIGINT NOT NULL,
    serial_end BIGINT NOT NULL,
    unit_type INTEGER NOT NULL,
    vintage INTEGER NOT NULL,
    activity_id TEXT NOT NULL,
    authorisation_id TEXT NOT NULL,
    cooperative_approach_id TEXT NOT NULL,
    first_transferring_party TEXT NOT NULL,
    account TEXT NOT NULL REFERENCES accounts (account_id),
    status TEXT NOT NULL CHECK (status IN ('held', 'reserved', 'frozen')),
    transfer_id TEXT,
    PRIMARY KEY (originating_registry, serial_start),
    CHECK (serial_start >= 1 AND serial_end >= serial_start),
    CHECK ((status = 'held') = (transfer_id IS NULL))
);
CREATE INDEX blocks_transfer ON blocks (transfer_id);

CREATE TABLE transfers (
    transfer_id TEXT PRIMARY KEY,
    direction TEXT NOT NULL CHECK (direction IN ('out', 'in')),
    partner TEXT NOT NULL,
    state INTEGER NOT NULL,
    quantity BIGINT NOT NULL,
    authorisation_id TEXT NOT NULL,
    first_transfer INTEGER NOT NULL,
    proposal_message_id TEXT NOT NULL,
    proposal_digest BYTEA_OR_BLOB NOT NULL,
    acceptance_digest BYTEA_OR_BLOB NOT NULL,
    expires_at BIGINT NOT NULL,
    rejection_code INTEGER NOT NULL,
    rejection_detail TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    -- When the sender proposed it (the proposal's sent_at): what a
    -- reconciliation snapshot is cut by, identical on both sides.
    proposed_at BIGINT NOT NULL,
    -- Set when the transfer reaches a final state: its place in the
    -- reconciliation tree and its leaves (core/reconcile.py).
    id_hash TEXT NOT NULL,
    blocks_leaf BYTEA_OR_BLOB,
    journal_leaf BYTEA_OR_BLOB,
    blocks_h1 BIGINT,
    blocks_h2 BIGINT,
    journal_h1 BIGINT,
    journal_h2 BIGINT
);
CREATE INDEX transfers_reconcile ON transfers (partner, id_hash);
CREATE INDEX transfers_state ON transfers (direction, state, expires_at);

-- The blocks a transfer moves, kept after it ends as its record.
CREATE TABLE transfer_blocks (
    transfer_id TEXT NOT NULL REFERENCES transfers (transfer_id),
    originating_registry TEXT NOT NULL,
    serial_start BIGINT NOT NULL,
    serial_end BIGINT NOT NULL,
    unit_type INTEGER NOT NULL,
    vintage INTEGER NOT NULL,
    activity_id TEXT NOT NULL,
    authorisation_id TEXT NOT NULL,
    cooperative_approach_id TEXT NOT NULL,
    first_transferring_party TEXT NOT NULL,
    PRIMARY KEY (transfer_id, originating_registry, serial_start)
);
CREATE INDEX transfer_blocks_serials ON transfer_blocks (originating_registry, serial_start);

-- The corresponding adjustment ledger. Each entry points at the journal entry
-- of the partner's signed acknowledgement recorded in the same transaction.
CREATE TABLE adjustments (
    id AUTO_ID,
    party TEXT NOT NULL,
    partner TEXT NOT NULL,
    -- The transfer it belongs to; NULL for a first transfer that is not an
    -- international transfer (OIMP first transferred at issuance or at use),
    -- which names its issuance or action in `reference` instead.
    transfer_id TEXT REFERENCES transfers (transfer_id),
    reference TEXT NOT NULL DEFAULT '',
    year INTEGER NOT NULL,
    amount BIGINT NOT NULL CHECK (amount <> 0),
    unit_type INTEGER NOT NULL,
    method TEXT NOT NULL,
    evidence_journal_id BIGINT REFERENCES journal (id),
    recorded_at BIGINT NOT NULL,
    -- An adjustment for a transfer always cites the partner's signed acknowledgement.
    CHECK (transfer_id IS NULL OR evidence_journal_id IS NOT NULL),
    CHECK (transfer_id IS NOT NULL OR reference <> ''),
    UNIQUE (transfer_id, year, unit_type)
);

-- What reconciliation found: each row names a transfer the two registries
-- disagree on; the blocks involved are frozen until an operator resolves it.
CREATE TABLE discrepancies (
    id AUTO_ID,
    reconciliation_id TEXT NOT NULL,
    partner TEXT NOT NULL,
    phase TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail TEXT NOT NULL,
    recorded_at BIGINT NOT NULL
);

-- Every admin request: which operator, what, and how it ended.
CREATE TABLE admin_audit (
    id AUTO_ID,
    operator TEXT NOT NULL,
    method TEXT NOT NULL,
    request TEXT NOT NULL,
    outcome TEXT NOT NULL,
    recorded_at BIGINT NOT NULL
);

-- Partners' signing keys learned through KeyRotation messages (the keys of
-- their cards come from the configuration), and revoked keys of anyone.
CREATE TABLE partner_keys (
    key_id TEXT PRIMARY KEY,
    party TEXT NOT NULL,
    public_key BYTEA_OR_BLOB NOT NULL,
    not_before BIGINT,
    not_after BIGINT,
    added_at BIGINT NOT NULL
);

CREATE TABLE revoked_keys (
    key_id TEXT PRIMARY KEY,
    party TEXT NOT NULL,
    source TEXT NOT NULL,
    revoked_at BIGINT NOT NULL
);

-- Article 6 actions as the AEF reports them: first transfers, transfers,
-- acquisitions, uses and cancellations, each with the block it concerns.
CREATE TABLE actions (
    id AUTO_ID,
    action_type TEXT NOT NULL,
    subtype TEXT NOT NULL,
    at BIGINT NOT NULL,
    originating_registry TEXT NOT NULL,
    serial_start BIGINT NOT NULL,
    serial_end BIGINT NOT NULL,
    unit_type INTEGER NOT NULL,
    vintage INTEGER NOT NULL,
    activity_id TEXT NOT NULL,
    authorisation_id TEXT NOT NULL,
    cooperative_approach_id TEXT NOT NULL,
    first_transferring_party TEXT NOT NULL,
    transferring_party TEXT NOT NULL,
    acquiring_party TEXT NOT NULL,
    using_party TEXT NOT NULL,
    oimp_purpose TEXT NOT NULL,
    use_year INTEGER,
    transfer_id TEXT NOT NULL
);

-- Holdings at 31 December of a year, frozen once taken.
CREATE TABLE holdings_snapshots (
    year INTEGER NOT NULL,
    taken_at BIGINT NOT NULL,
    account TEXT NOT NULL,
    originating_registry TEXT NOT NULL,
    serial_start BIGINT NOT NULL,
    serial_end BIGINT NOT NULL,
    unit_type INTEGER NOT NULL,
    vintage INTEGER NOT NULL,
    activity_id TEXT NOT NULL,
    authorisation_id TEXT NOT NULL,
    cooperative_approach_id TEXT NOT NULL,
    first_transferring_party TEXT NOT NULL,
    PRIMARY KEY (year, originating_registry, serial_start)
);

CREATE TABLE snapshot_years (
    year INTEGER PRIMARY KEY,
    taken_at BIGINT NOT NULL
);
