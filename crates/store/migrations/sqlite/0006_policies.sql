-- Applied key policies, every version kept (keywarden policy apply). The highest version
-- is in force; none means the built-in defaults.
CREATE TABLE policies (
    version    BIGINT PRIMARY KEY,
    text       TEXT   NOT NULL,
    applied_at BIGINT NOT NULL,
    applied_by TEXT   NOT NULL
);
