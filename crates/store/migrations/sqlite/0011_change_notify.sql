-- Several nodes need PostgreSQL (its NOTIFY); SQLite serves one node, which evicts its
-- own cache on every change. Kept so both backends have the same migration names.
SELECT 1;
