-- The outbox of key events for connected services: one row per key entry of the audit
-- trail, written in the same transaction (seq is that entry's seq, so it only grows).
-- Issue 5's dispatcher delivers them and records confirmations.
CREATE TABLE key_events (
    seq    BIGINT PRIMARY KEY,
    time   BIGINT NOT NULL,
    key_id TEXT   NOT NULL,
    event  TEXT   NOT NULL,
    reason TEXT,
    actor  TEXT   NOT NULL
);
