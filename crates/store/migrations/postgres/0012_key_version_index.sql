-- Verify renews an expired cache entry by comparing the key's version (Store::key_stamp).
-- Covering the lookup by id, the read touches one small index instead of the id index
-- and then the wide keys row.
CREATE INDEX keys_id_version ON keys (id, version);
