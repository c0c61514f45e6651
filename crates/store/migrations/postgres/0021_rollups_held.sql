-- Usage rollups are no longer written in each batch's transaction: a node adds a batch's
-- rollups to what it holds in memory and writes them every few seconds (or when read),
-- so a key used many times in that window costs one upsert per rollup row, not one per
-- batch. A batch whose rollups a node still holds names that node here; writing them
-- clears it in the same transaction, which makes each batch's rollups land exactly once.
-- A node holds a session advisory lock on its id while it lives, so another node can
-- tell a dead node's batches and roll them up from the events (postgres::held).
ALTER TABLE usage_batches ADD COLUMN rollups_held_by BIGINT;
CREATE INDEX usage_batches_rollups_held ON usage_batches (rollups_held_by)
    WHERE rollups_held_by IS NOT NULL;
