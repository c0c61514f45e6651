-- The machine cause of a key's state, apart from the free-text reason, so that no
-- reason a person types changes what verify answers. Rows from before it: the codes
-- keywarden itself wrote as the reason.
ALTER TABLE keys ADD COLUMN state_cause TEXT;
UPDATE keys SET state_cause = state_reason
WHERE state_reason IN ('OWNER_DISABLED', 'IDLE_EXPIRED', 'TTL_EXPIRED', 'ROTATION_GRACE_ENDED',
                       'ROTATION_OVERDUE', 'POLICY_VIOLATION');
