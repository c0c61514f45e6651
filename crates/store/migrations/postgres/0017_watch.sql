-- Watching keys: per-key rate limits, canary keys, and alerts of every kind with a
-- severity, the evidence that tripped them and a state people move them through.
ALTER TABLE keys ADD COLUMN rate_limit TEXT;
ALTER TABLE keys ADD COLUMN canary BIGINT NOT NULL DEFAULT 0;

-- An alert about a source (BRUTE_FORCE) has no key.
ALTER TABLE alerts ALTER COLUMN key_id DROP NOT NULL;
ALTER TABLE alerts ADD COLUMN severity TEXT NOT NULL DEFAULT 'high';
ALTER TABLE alerts ALTER COLUMN severity DROP DEFAULT;
-- The numbers that tripped it, as JSON.
ALTER TABLE alerts ADD COLUMN evidence TEXT NOT NULL DEFAULT '{}';
-- open, acknowledged or resolved; who moved it there, when and why.
ALTER TABLE alerts ADD COLUMN state TEXT NOT NULL DEFAULT 'open';
ALTER TABLE alerts ADD COLUMN state_at BIGINT;
ALTER TABLE alerts ADD COLUMN state_by TEXT;
ALTER TABLE alerts ADD COLUMN state_reason TEXT;
-- What makes two sightings one alert (kind, key, source network), while the alert folds
-- repeats; NULL once it no longer does. Unique, so that nodes raising the same alert at
-- once make one.
ALTER TABLE alerts ADD COLUMN place TEXT;
CREATE INDEX alerts_by_state ON alerts (state, seq);
CREATE UNIQUE INDEX alerts_place ON alerts (place);

-- A rate-limited key's theoretical arrival time (GCRA, microseconds): several nodes
-- share one limit. SQLite serves one node, which keeps it in memory.
CREATE TABLE key_rates (
    key_id TEXT PRIMARY KEY,
    tat    BIGINT NOT NULL
);
