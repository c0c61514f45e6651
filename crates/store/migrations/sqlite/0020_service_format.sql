-- How a service's webhook messages are shaped: `standard` (Standard Webhooks JSON, for
-- machines) or `slack` (a Slack-compatible incoming webhook: a message for people).
ALTER TABLE services ADD COLUMN format TEXT NOT NULL DEFAULT 'standard';
