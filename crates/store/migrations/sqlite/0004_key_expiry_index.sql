-- The expiry sweep looks for keys still stored as active or suspended whose end has
-- passed; without this it reads the whole table every pass.
CREATE INDEX keys_expires_at ON keys (expires_at);
