-- The usage log becomes tamper-evident: every batch the usage writer stores gets a row,
-- written in the same transaction as its events, chained to the batch before it:
-- hash = SHA-256(prev_hash ‖ canonical batch) (keywarden_core::usage_chain, docs/usage-log.md).
CREATE TABLE usage_batches (
    seq       BIGINT PRIMARY KEY,
    -- The events it covers: first_seq to last_seq, consecutive.
    first_seq BIGINT NOT NULL,
    last_seq  BIGINT NOT NULL,
    events    BIGINT NOT NULL,
    -- Its newest event's time: what retention judges it by.
    time      BIGINT NOT NULL,
    prev_hash TEXT   NOT NULL,
    hash      TEXT   NOT NULL,
    -- Each event's CRC-32, 4 bytes big-endian, in seq order: which event of a broken
    -- batch was edited. Not part of the chain.
    digests   BYTEA  NOT NULL
);
-- The last batch written: batch writers take it first (a row lock here, the write lock
-- on SQLite), and a verifier tells a truncated log by it. Events stored before this
-- migration (up to unchained_upto) belong to no batch.
CREATE TABLE usage_chain_head (
    id             BIGINT PRIMARY KEY CHECK (id = 1),
    batch_seq      BIGINT NOT NULL,
    hash           TEXT   NOT NULL,
    unchained_upto BIGINT NOT NULL
);
INSERT INTO usage_chain_head (id, batch_seq, hash, unchained_upto)
SELECT 1, 0, '0000000000000000000000000000000000000000000000000000000000000000',
       COALESCE(MAX(seq), 0) FROM usage_events;
-- Prefixes of the log removed by retention, each with the hash of its last batch, where
-- the chain of what remains starts.
CREATE TABLE usage_retention (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    first_batch BIGINT NOT NULL,
    last_batch  BIGINT NOT NULL,
    first_seq   BIGINT NOT NULL,
    last_seq    BIGINT NOT NULL,
    events      BIGINT NOT NULL,
    last_hash   TEXT   NOT NULL,
    -- Events older than this (by their environment's retention) were due.
    retained_at BIGINT NOT NULL
);
