-- The audit trail becomes a hash chain (core's audit_chain). Entries written before this
-- migration are sealed by the store when it opens (hashes are computed in Rust), in seq
-- order, renumbered without gaps.
ALTER TABLE audit_events ALTER COLUMN seq DROP IDENTITY IF EXISTS;
ALTER TABLE audit_events ADD COLUMN prev_hash TEXT;
ALTER TABLE audit_events ADD COLUMN hash TEXT;
CREATE INDEX audit_events_target ON audit_events (target, seq);

-- The last entry written. Every audited transaction updates this one row first, so
-- writers take turns on the chain (a row lock on PostgreSQL, the write lock on SQLite),
-- and a trail whose newest rows were deleted no longer matches it.
CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  BIGINT  NOT NULL,
    hash TEXT    NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

-- Ranges moved out of the live table into archive files (keywarden audit archive).
CREATE TABLE audit_archives (
    last_seq    BIGINT PRIMARY KEY,
    first_seq   BIGINT NOT NULL,
    last_hash   TEXT   NOT NULL,
    entries     BIGINT NOT NULL,
    file_sha256 TEXT   NOT NULL,
    archived_at BIGINT NOT NULL,
    archived_by TEXT   NOT NULL
);
