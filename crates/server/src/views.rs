//! Domain records → wire views.

use keywarden_core::model::{Subject, TokenRecord};
use keywarden_core::KeyRecord;
use keywarden_proto::{KeyView, SubjectView, TokenView};
use time::OffsetDateTime;

pub fn key_view(k: &KeyRecord, now: OffsetDateTime, subjects: Option<Vec<Subject>>) -> KeyView {
    KeyView {
        id: k.id.to_string(),
        name: k.name.clone(),
        description: k.description.clone(),
        owner: k.owner.clone(),
        systems: k.systems.clone(),
        environment: k.environment.clone(),
        scopes: k.scopes.iter().map(ToString::to_string).collect(),
        created_at: k.created_at,
        created_by: k.created_by.clone(),
        expires_at: k.expires_at,
        state: k.effective_state(now).as_str().to_owned(),
        state_reason: k.state_reason.clone(),
        state_cause: k.state_cause.map(|c| c.as_str().to_owned()),
        state_changed_at: k.state_changed_at,
        allowed_cidrs: k.allowed_cidrs.iter().map(ToString::to_string).collect(),
        max_uses: k.max_uses,
        rate_limit: k.rate_limit.map(|r| r.to_string()),
        canary: k.canary,
        uses: k.uses,
        remaining_uses: k.remaining_uses(),
        last_used_at: k.last_used_at,
        last_used_from: k.last_used_from.clone(),
        rotated_from: k.rotated_from.as_ref().map(ToString::to_string),
        rotated_to: k.rotated_to.as_ref().map(ToString::to_string),
        metadata: k.metadata.clone(),
        hint: k.hint.clone(),
        subjects: subjects.map(|s| {
            s.into_iter()
                .map(|s| SubjectView {
                    subject: s.subject,
                    first_seen: s.first_seen,
                    last_seen: s.last_seen,
                })
                .collect()
        }),
        propagation: None,
    }
}

pub fn token_view(t: &TokenRecord) -> TokenView {
    TokenView {
        last_used_at: t.last_used_at,
        id: t.id.to_string(),
        name: t.name.clone(),
        owner: t.owner.clone(),
        role: t.role.as_str().to_owned(),
        environments: t.environments.clone(),
        created_at: t.created_at,
        created_by: t.created_by.clone(),
        expires_at: t.expires_at,
        revoked_at: t.revoked_at,
        hint: t.hint.clone(),
    }
}
