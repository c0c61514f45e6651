-- Several nodes (issue 7): every audit entry (and so every key event, which shares its
-- seq) is announced to the other nodes, which evict what changed from their caches.
-- The payload is the seq; a node replays from its last seen seq anyway, so a missed
-- notification costs at most one poll interval.
CREATE FUNCTION keywarden_announce_change() RETURNS trigger AS $$
BEGIN
    PERFORM pg_notify('keywarden_changes', NEW.seq::text);
    RETURN NEW;
END
$$ LANGUAGE plpgsql;

CREATE TRIGGER audit_events_announce AFTER INSERT ON audit_events
    FOR EACH ROW EXECUTE FUNCTION keywarden_announce_change();
