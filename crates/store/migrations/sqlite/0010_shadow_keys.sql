-- Shadow keys (issue 6): foreign secrets found by `keywarden scan --import`, recorded so
-- that reports show them. Only a fingerprint (SHA-256 of the secret) is kept, never the
-- secret.
CREATE TABLE shadow_keys (
    fingerprint TEXT PRIMARY KEY,
    kind        TEXT   NOT NULL,
    severity    TEXT   NOT NULL,
    location    TEXT   NOT NULL,
    line        BIGINT NOT NULL,
    first_seen  BIGINT NOT NULL,
    last_seen   BIGINT NOT NULL,
    sightings   BIGINT NOT NULL,
    imported_by TEXT   NOT NULL
);
