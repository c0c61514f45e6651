-- Same names as SQLite's 0002. PostgreSQL keeps the (key_id, seq) index and folds usage
-- stats in the same transaction as each batch (the multi-node issue revisits this), so
-- prev_seq stays empty and usage_state.folded_seq is not used here.
ALTER TABLE usage_events ADD COLUMN counted BIGINT NOT NULL DEFAULT 0;
ALTER TABLE usage_events ADD COLUMN prev_seq BIGINT;
ALTER TABLE key_usage ALTER COLUMN batched_uses SET DEFAULT 0;
ALTER TABLE key_usage ALTER COLUMN last_used_at DROP NOT NULL;
ALTER TABLE key_usage ADD COLUMN last_seq BIGINT;
CREATE TABLE usage_state (
    id         BIGINT PRIMARY KEY CHECK (id = 1),
    folded_seq BIGINT NOT NULL
);
INSERT INTO usage_state (id, folded_seq) VALUES (1, 0);
