-- The person accountable for an admin token; audit entries name them as the actor.
ALTER TABLE admin_tokens ADD COLUMN owner TEXT;
