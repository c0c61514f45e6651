-- Usage rollups: per key and hour, what the usage log holds, kept long after the log is
-- too large to scan (400 days by default; the enforcer removes older hours). Written by
-- the usage pipeline itself, never by rescanning the log: on PostgreSQL in each batch's
-- transaction, on SQLite in the fold step that moves the key's stats and last_seq, so
-- every logged event is counted exactly once. Same tables on both backends.
--
-- key_id is '' for events that named no key (malformed keys): they roll up under no key,
-- per hour, code and source network. hour is the unix ms of the hour's start (UTC).
CREATE TABLE usage_rollups (
    key_id TEXT   NOT NULL,
    hour   BIGINT NOT NULL,
    code   TEXT   NOT NULL,
    events BIGINT NOT NULL,
    PRIMARY KEY (key_id, hour, code)
);
CREATE INDEX usage_rollups_hour ON usage_rollups (hour);

-- The distinct values a key's events carried in an hour, one row per (key, hour, kind,
-- value, code) with a count: kind is network (the /24 of an IPv4 source, the /64 of an
-- IPv6 one), scope, subject or agent (user agent). A row per value, not a JSON set, so a
-- batch adds to a value with one upsert instead of reading and rewriting the whole set.
-- Networks are stored as sortable text ('4' and 8 hex digits, '6' and the 16 hex digits
-- of the /64), so a CIDR is one range of values (usage_rollup_values_by_value).
CREATE TABLE usage_rollup_values (
    key_id     TEXT   NOT NULL,
    hour       BIGINT NOT NULL,
    kind       TEXT   NOT NULL,
    value      TEXT   NOT NULL,
    code       TEXT   NOT NULL,
    events     BIGINT NOT NULL,
    first_seen BIGINT NOT NULL,
    last_seen  BIGINT NOT NULL,
    PRIMARY KEY (key_id, hour, kind, value, code)
);
CREATE INDEX usage_rollup_values_by_value ON usage_rollup_values (kind, value, hour);
CREATE INDEX usage_rollup_values_hour ON usage_rollup_values (hour);
