-- On PostgreSQL, the node that holds a batch's rollups in memory until it writes them.
-- SQLite writes rollups in its fold, which the log recovers on its own; the column stays
-- NULL here and exists so that one set of queries reads both schemas.
ALTER TABLE usage_batches ADD COLUMN rollups_held_by BIGINT;
CREATE INDEX usage_batches_rollups_held ON usage_batches (rollups_held_by)
    WHERE rollups_held_by IS NOT NULL;
