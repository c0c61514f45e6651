-- The owner registry: the people keys belong to. Disabling an owner acts on their keys
-- in the same transaction (revoke or suspend, as the policy says).
CREATE TABLE owners (
    identity     TEXT   PRIMARY KEY,
    display_name TEXT   NOT NULL,
    status       TEXT   NOT NULL,
    manager      TEXT,
    created_at   BIGINT NOT NULL,
    updated_at   BIGINT NOT NULL
);
