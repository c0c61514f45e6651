-- When an admin token was last presented, for `token list` and stale-token reviews.
ALTER TABLE admin_tokens ADD COLUMN last_used_at BIGINT;
