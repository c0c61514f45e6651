-- Rows found in audit_events or key_events past the recorded head (written around
-- keywarden, so not part of the chain) are moved here by `keywarden audit quarantine`:
-- kept as evidence, out of the chain, so that audited writes can go on.
CREATE TABLE audit_quarantine (
    id             BIGINT NOT NULL,
    source         TEXT   NOT NULL,
    seq            BIGINT NOT NULL,
    row_json       TEXT   NOT NULL,
    quarantined_at BIGINT NOT NULL,
    PRIMARY KEY (id, source, seq)
);
