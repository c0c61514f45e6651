-- Connected services (issue 5): webhook receivers and pull gateways, the delivery of
-- each key event to each service that subscribes to it, and alerts on keys still in use.

-- What the event was about (an alert's source address, a state change's before/after):
-- the audit entry's details, so a webhook carries them.
ALTER TABLE key_events ADD COLUMN details TEXT NOT NULL DEFAULT '{}';
-- A key's latest event (its propagation) without scanning the outbox.
CREATE INDEX key_events_by_key ON key_events (key_id, seq);

CREATE TABLE services (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL UNIQUE,
    -- NULL for a pull service (a gateway reading /v1/events and acknowledging).
    webhook_url    TEXT,
    -- Comma-separated categories: revoke, suspend, rotate, expire, alert, create, notice.
    events         TEXT NOT NULL,
    -- The signing secret is derived from the pepper and this salt; it is never stored.
    secret_salt    TEXT NOT NULL,
    pepper_version BIGINT NOT NULL,
    created_at     BIGINT NOT NULL,
    created_by     TEXT NOT NULL,
    -- key_events up to this seq have their deliveries rows for this service.
    start_seq      BIGINT NOT NULL,
    fanout_seq     BIGINT NOT NULL,
    -- The highest seq the service acknowledged through /v1/services/{id}/ack.
    acked_seq      BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE deliveries (
    service_id   TEXT   NOT NULL REFERENCES services (id) ON DELETE CASCADE,
    seq          BIGINT NOT NULL,
    key_id       TEXT   NOT NULL,
    event        TEXT   NOT NULL,
    -- pending (not tried yet, or waiting for an ack), failing (will be tried again at
    -- next_at), confirmed, abandoned (the retry window ended).
    state        TEXT   NOT NULL,
    attempts     BIGINT NOT NULL DEFAULT 0,
    next_at      BIGINT NOT NULL,
    last_error   TEXT,
    created_at   BIGINT NOT NULL,
    confirmed_at BIGINT,
    PRIMARY KEY (service_id, seq)
);
CREATE INDEX deliveries_open ON deliveries (state, next_at);
CREATE INDEX deliveries_by_key ON deliveries (key_id, seq);

-- KEY_STILL_IN_USE: a revoked, expired or suspended key presented to verify. seq is the
-- audit entry that raised it; repeats from the same place within the alert window only
-- count up.
CREATE TABLE alerts (
    seq         BIGINT PRIMARY KEY,
    time        BIGINT NOT NULL,
    kind        TEXT   NOT NULL,
    key_id      TEXT   NOT NULL,
    code        TEXT   NOT NULL,
    source_ip   TEXT,
    user_agent  TEXT,
    subject     TEXT,
    -- Milliseconds since the key was revoked, suspended or expired.
    since_ms    BIGINT,
    repeats     BIGINT NOT NULL DEFAULT 0,
    last_at     BIGINT NOT NULL
);
CREATE INDEX alerts_by_key ON alerts (key_id, seq);
