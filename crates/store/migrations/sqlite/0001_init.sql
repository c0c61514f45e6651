-- Times are unix milliseconds (BIGINT); lists and maps are JSON text.
CREATE TABLE keys (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL UNIQUE,
    hash             TEXT    NOT NULL,
    pepper_version   BIGINT  NOT NULL,
    hint             TEXT    NOT NULL,
    name             TEXT    NOT NULL,
    description      TEXT    NOT NULL,
    owner            TEXT    NOT NULL,
    systems          TEXT    NOT NULL,
    environment      TEXT    NOT NULL,
    scopes           TEXT    NOT NULL,
    created_at       BIGINT  NOT NULL,
    created_by       TEXT    NOT NULL,
    expires_at       BIGINT  NOT NULL,
    state            TEXT    NOT NULL,
    state_reason     TEXT,
    state_changed_at BIGINT,
    allowed_cidrs    TEXT    NOT NULL,
    max_uses         BIGINT,
    -- Uses spent atomically against max_uses at verify time; other valid uses are
    -- counted in key_usage.batched_uses by the usage writer.
    uses             BIGINT  NOT NULL DEFAULT 0,
    rotated_from     TEXT,
    rotated_to       TEXT,
    metadata         TEXT    NOT NULL,
    version          BIGINT  NOT NULL DEFAULT 1
);
CREATE INDEX keys_owner ON keys (owner);
CREATE INDEX keys_environment ON keys (environment);

CREATE TABLE key_systems (
    key_id TEXT NOT NULL,
    system TEXT NOT NULL,
    PRIMARY KEY (key_id, system)
);
CREATE INDEX key_systems_system ON key_systems (system);

-- Kept apart from the wide keys rows: the usage writer updates it for every batch, and
-- narrow rows mean fewer pages written per batch.
CREATE TABLE key_usage (
    key_id         TEXT   PRIMARY KEY,
    batched_uses   BIGINT NOT NULL,
    last_used_at   BIGINT NOT NULL,
    last_used_from TEXT
);

CREATE TABLE key_subjects (
    key_id     TEXT   NOT NULL,
    subject    TEXT   NOT NULL,
    first_seen BIGINT NOT NULL,
    last_seen  BIGINT NOT NULL,
    PRIMARY KEY (key_id, subject)
);

CREATE TABLE usage_events (
    seq         INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id      TEXT,
    time        BIGINT NOT NULL,
    code        TEXT   NOT NULL,
    source_ip   TEXT,
    scope       TEXT,
    environment TEXT,
    subject     TEXT,
    user_agent  TEXT
);
CREATE INDEX usage_events_key ON usage_events (key_id, seq);

CREATE TABLE admin_tokens (
    id             TEXT   PRIMARY KEY,
    hash           TEXT   NOT NULL,
    pepper_version BIGINT NOT NULL,
    hint           TEXT   NOT NULL,
    name           TEXT   NOT NULL,
    role           TEXT   NOT NULL,
    environments   TEXT,
    created_at     BIGINT NOT NULL,
    created_by     TEXT   NOT NULL,
    expires_at     BIGINT,
    revoked_at     BIGINT
);

CREATE TABLE audit_events (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    time       BIGINT NOT NULL,
    actor      TEXT   NOT NULL,
    actor_name TEXT   NOT NULL,
    source_ip  TEXT,
    user_agent TEXT,
    request_id TEXT,
    action     TEXT   NOT NULL,
    target     TEXT   NOT NULL,
    reason     TEXT,
    details    TEXT   NOT NULL
);
