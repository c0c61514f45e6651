-- Watching keys: per-key rate limits, canary keys, and alerts of every kind with a
-- severity, the evidence that tripped them and a state people move them through.
ALTER TABLE keys ADD COLUMN rate_limit TEXT;
ALTER TABLE keys ADD COLUMN canary BIGINT NOT NULL DEFAULT 0;

-- SQLite cannot drop a NOT NULL, and an alert about a source (BRUTE_FORCE) has no key:
-- the table is rebuilt.
CREATE TABLE alerts_v2 (
    seq          BIGINT PRIMARY KEY,
    time         BIGINT NOT NULL,
    kind         TEXT   NOT NULL,
    severity     TEXT   NOT NULL,
    key_id       TEXT,
    code         TEXT   NOT NULL,
    source_ip    TEXT,
    user_agent   TEXT,
    subject      TEXT,
    since_ms     BIGINT,
    -- The numbers that tripped it, as JSON.
    evidence     TEXT   NOT NULL DEFAULT '{}',
    repeats      BIGINT NOT NULL DEFAULT 0,
    last_at      BIGINT NOT NULL,
    -- open, acknowledged or resolved; who moved it there, when and why.
    state        TEXT   NOT NULL DEFAULT 'open',
    state_at     BIGINT,
    state_by     TEXT,
    state_reason TEXT,
    -- What makes two sightings one alert (kind, key, source network), while the alert
    -- folds repeats; NULL once it no longer does. Unique, so that nodes raising the same
    -- alert at once make one.
    place        TEXT
);
INSERT INTO alerts_v2 (seq, time, kind, severity, key_id, code, source_ip, user_agent, subject,
                       since_ms, repeats, last_at)
SELECT seq, time, kind, 'high', key_id, code, source_ip, user_agent, subject, since_ms,
       repeats, last_at FROM alerts;
DROP TABLE alerts;
ALTER TABLE alerts_v2 RENAME TO alerts;
CREATE INDEX alerts_by_key ON alerts (key_id, seq);
CREATE INDEX alerts_by_state ON alerts (state, seq);
CREATE UNIQUE INDEX alerts_place ON alerts (place);
