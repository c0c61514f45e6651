-- Usage events become an append-only log: no secondary index, so writing an event touches
-- only the table's last page. Each event points at the previous event of the same key
-- (prev_seq), and key_usage.last_seq at the newest, so a key's events are read newest
-- first by walking that chain. Per-key stats are folded from the log every few seconds;
-- usage_state.folded_seq says how far, so a restart refolds what a crash left unfolded.
CREATE TABLE usage_log (
    seq         INTEGER PRIMARY KEY,
    key_id      TEXT,
    time        BIGINT NOT NULL,
    code        TEXT   NOT NULL,
    source_ip   TEXT,
    scope       TEXT,
    environment TEXT,
    subject     TEXT,
    user_agent  TEXT,
    -- Already counted against a usage cap at verify time (keys.uses).
    counted     BIGINT NOT NULL DEFAULT 0,
    prev_seq    BIGINT
);
INSERT INTO usage_log (seq, key_id, time, code, source_ip, scope, environment, subject,
                       user_agent, counted, prev_seq)
SELECT seq, key_id, time, code, source_ip, scope, environment, subject, user_agent, 0,
       CASE WHEN key_id IS NULL THEN NULL
            ELSE LAG(seq) OVER (PARTITION BY key_id ORDER BY seq) END
FROM usage_events;
DROP TABLE usage_events;
ALTER TABLE usage_log RENAME TO usage_events;

-- last_used_at may now be empty: a key can have events (denied verifies) and no use yet.
CREATE TABLE key_usage_new (
    key_id         TEXT   PRIMARY KEY,
    batched_uses   BIGINT NOT NULL DEFAULT 0,
    last_used_at   BIGINT,
    last_used_from TEXT,
    last_seq       BIGINT
);
INSERT INTO key_usage_new (key_id, batched_uses, last_used_at, last_used_from)
SELECT key_id, batched_uses, last_used_at, last_used_from FROM key_usage;
DROP TABLE key_usage;
ALTER TABLE key_usage_new RENAME TO key_usage;
INSERT INTO key_usage (key_id, last_seq)
SELECT key_id, MAX(seq) FROM usage_events
WHERE key_id IN (SELECT id FROM keys) GROUP BY key_id
ON CONFLICT (key_id) DO UPDATE SET last_seq = excluded.last_seq;

CREATE TABLE usage_state (
    id         BIGINT PRIMARY KEY CHECK (id = 1),
    folded_seq BIGINT NOT NULL
);
INSERT INTO usage_state (id, folded_seq) SELECT 1, COALESCE(MAX(seq), 0) FROM usage_events;
