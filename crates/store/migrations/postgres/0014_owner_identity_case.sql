-- Owner identities compare case-insensitively (as e-mail addresses and SCIM userNames
-- do); keywarden keeps them lower-case. Where one person was registered under several
-- spellings, a spelling that is not active (disabled, deleted) wins: offboarding one
-- spelling must offboard the person. Byte order (COLLATE "C", SQLite's own) picks
-- the row kept, so both backends keep the same one.
UPDATE owners SET status = (
    SELECT o2.status FROM owners o2
    WHERE lower(o2.identity) = lower(owners.identity) AND o2.status <> 'active'
    ORDER BY o2.identity COLLATE "C" LIMIT 1)
WHERE status = 'active' AND EXISTS (
    SELECT 1 FROM owners o2
    WHERE lower(o2.identity) = lower(owners.identity) AND o2.status <> 'active');
DELETE FROM owners WHERE EXISTS (
    SELECT 1 FROM owners o2
    WHERE lower(o2.identity) = lower(owners.identity) AND o2.identity COLLATE "C" < owners.identity COLLATE "C");
UPDATE owners SET identity = lower(identity), manager = lower(manager);
UPDATE keys SET owner = lower(owner) WHERE owner <> lower(owner);
UPDATE admin_tokens SET owner = lower(owner) WHERE owner <> lower(owner);
