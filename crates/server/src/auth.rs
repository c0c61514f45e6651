//! Bearer authentication with keywarden's own admin tokens, and role checks.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::header::{AUTHORIZATION, USER_AGENT};
use axum::http::request::Parts;
use axum::http::HeaderMap;
use keywarden_core::key_format::{self, ADMIN_ENV};
use keywarden_core::model::{Actor, TokenRecord};
use keywarden_core::role::Permission;
use keywarden_core::KeyId;

use crate::error::ApiError;
use crate::state::SharedState;

/// An authenticated caller and where the request came from.
pub struct Principal {
    pub token: Arc<TokenRecord>,
    pub peer: Option<IpAddr>,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<String>,
    pub request_id: Option<String>,
}

impl Principal {
    pub fn require(&self, p: Permission) -> Result<(), ApiError> {
        if self.token.role.allows(p) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "role `{}` may not do this",
                self.token.role
            )))
        }
    }

    pub fn may_act_in(&self, environment: &str) -> bool {
        self.token.may_act_in(environment)
    }

    pub fn actor(&self) -> Actor {
        Actor {
            id: format!("token:{}", self.token.id),
            // The person, when the token names one; else the token's own name.
            name: self
                .token
                .owner
                .clone()
                .unwrap_or_else(|| self.token.name.clone()),
            source_ip: self.client_ip.map(|ip| ip.to_string()),
            user_agent: self.user_agent.clone(),
            request_id: self.request_id.clone(),
        }
    }
}

impl FromRequestParts<SharedState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &SharedState) -> Result<Self, ApiError> {
        let token = authenticate(app, &parts.headers).await?;
        // Before any extractor reads the path, query or body: the route's permission,
        // then no key in the URI.
        crate::guard::before_handler(parts, &token)?;
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip());
        Ok(Self {
            token,
            peer,
            client_ip: client_ip(peer, &parts.headers, &app.config.trusted_proxies),
            user_agent: header_text(&parts.headers, USER_AGENT.as_str(), 256),
            request_id: header_text(&parts.headers, "x-request-id", 128),
        })
    }
}

async fn authenticate(
    app: &SharedState,
    headers: &HeaderMap,
) -> Result<Arc<TokenRecord>, ApiError> {
    const HOW: &str = "send `Authorization: Bearer <admin token>`";
    let value = headers.get(AUTHORIZATION).ok_or(ApiError::Unauthenticated(
        "missing admin token: send `Authorization: Bearer <admin token>`",
    ))?;
    let presented = value
        .to_str()
        .ok()
        .and_then(bearer_credentials)
        .ok_or(ApiError::Unauthenticated(HOW))?;
    authenticate_token(app, presented).await
}

/// The credentials of an `Authorization: Bearer …` value. The scheme is
/// case-insensitive (RFC 9110 §11.1; RFC 6750 §2.1).
pub fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, credentials) = value.trim_start().split_once(' ')?;
    let credentials = credentials.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !credentials.is_empty()).then_some(credentials)
}

/// Checks a presented admin token.
pub async fn authenticate_token(
    app: &SharedState,
    presented: &str,
) -> Result<Arc<TokenRecord>, ApiError> {
    let parsed = key_format::parse_parts(presented, &app.config.key_prefix)
        .map_err(|_| ApiError::Unauthenticated("malformed admin token"))?;
    if parsed.environment != ADMIN_ENV {
        return Err(ApiError::Unauthenticated(
            "this is a key, not an admin token: keys are checked with POST /v1/verify",
        ));
    }
    let now = app.now();
    let (token, fresh) = match memoized_token(app, &parsed.id, now) {
        Some(memo) => (Some(memo.token), memo.fresh),
        None => (
            app.tokens
                .get_or_load(&parsed.id, now, || async {
                    Ok::<_, ApiError>(app.store.get_token(&parsed.id).await?.map(Arc::new))
                })
                .await?,
            true,
        ),
    };
    match token {
        Some(t) if app.hasher.matches_text(parsed.plain, &t.hash) && t.is_usable(now) => {
            if fresh {
                mark_used(app, &t);
            }
            Ok(t)
        }
        _ => Err(ApiError::Unauthenticated(
            "invalid, expired or revoked admin token",
        )),
    }
}

/// A thread's copy of the token record it last authenticated, while the token cache
/// holds it unchanged. Every request presents the same few tokens, and the shared cache
/// entry's lock word and reference count, written by every worker on every request,
/// bounced between the cores (docs/benchmarks.md). The secret is still checked against
/// the record's hash on every request; only the record is memoized.
struct TokenMemo {
    cache: u64,
    id: KeyId,
    generation: u64,
    expires: crate::cache::Expiry,
    token: Arc<TokenRecord>,
}

thread_local! {
    static TOKEN_MEMO: std::cell::RefCell<Option<TokenMemo>> = const { std::cell::RefCell::new(None) };
}

/// Records a token's use off the request path. Called only when a worker loads or
/// refreshes its copy of the record (about once per cache lifetime per worker), so
/// `last_used_at` is exact to within that lifetime at no cost to each request.
fn mark_used(app: &SharedState, t: &TokenRecord) {
    // At most one write per token per interval, however the workers' copies churn
    // (several tokens taking turns on one worker refresh its copy on every request).
    const EVERY: std::time::Duration = std::time::Duration::from_secs(30);
    static MARKED: std::sync::LazyLock<
        std::sync::Mutex<std::collections::HashMap<KeyId, std::time::Instant>>,
    > = std::sync::LazyLock::new(Default::default);
    {
        let Ok(mut marked) = MARKED.lock() else {
            return;
        };
        let now = std::time::Instant::now();
        if marked
            .get(&t.id)
            .is_some_and(|at| now.duration_since(*at) < EVERY)
        {
            return;
        }
        if marked.len() >= 10_000 {
            marked.clear();
        }
        marked.insert(t.id.clone(), now);
    }
    let store = app.store.clone();
    let id = t.id.clone();
    let now = app.now();
    tokio::spawn(async move {
        if let Err(e) = store.mark_token_used(&id, now).await {
            tracing::warn!(error = %e, token_id = %id, "could not record a token's use");
        }
    });
}

/// A memoized token record, and whether the memo was (re)built for this request.
struct Memoized {
    token: Arc<TokenRecord>,
    fresh: bool,
}

fn memoized_token(app: &SharedState, id: &KeyId, now: time::OffsetDateTime) -> Option<Memoized> {
    TOKEN_MEMO.with(|memo| {
        let mut memo = memo.try_borrow_mut().ok()?;
        let good = memo.as_ref().is_some_and(|m| {
            m.cache == app.tokens.instance()
                && m.id == *id
                && app.tokens.is_current(m.generation)
                && m.expires.is_fresh(now)
        });
        let fresh = !good;
        if !good {
            let (token, expires, generation) = app.tokens.get_for_memo(id, now)?;
            *memo = Some(TokenMemo {
                cache: app.tokens.instance(),
                id: id.clone(),
                generation,
                expires,
                // A copy of this thread's own: its reference count stays on this core.
                token: Arc::new(TokenRecord::clone(token.as_ref()?)),
            });
        }
        memo.as_ref().map(|m| Memoized {
            token: m.token.clone(),
            fresh,
        })
    })
}

/// The address of the client: the peer, unless the peer is a trusted proxy, in which case
/// the right-most `X-Forwarded-For` entry that is not itself a trusted proxy.
pub fn client_ip(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    trusted: &[ipnet::IpNet],
) -> Option<IpAddr> {
    let peer = peer?;
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    Some(
        forwarded
            .into_iter()
            .rev()
            .find(|ip| !is_trusted(ip))
            .unwrap_or(peer),
    )
}

pub fn header_text(headers: &HeaderMap, name: &str, max: usize) -> Option<String> {
    let s = headers.get(name).and_then(|v| v.to_str().ok())?;
    // These values are kept (audit entries, usage events): a key pasted into one is not.
    let s = key_format::redact_keys(s);
    let s = s.as_ref();
    // `to_str` admits visible ASCII, spaces and tabs; without a tab, a short value is kept whole.
    if s.len() <= max && !s.bytes().any(|b| b.is_ascii_control()) {
        return Some(s.to_owned());
    }
    Some(s.chars().filter(|c| !c.is_control()).take(max).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_text_drops_control_characters_and_truncates() {
        let mut h = HeaderMap::new();
        h.insert("user-agent", "curl/8.5".parse().unwrap());
        h.insert("x-tabbed", "a\tb".parse().unwrap());
        h.insert("x-long", "abcdef".parse().unwrap());
        assert_eq!(
            header_text(&h, "user-agent", 256).as_deref(),
            Some("curl/8.5")
        );
        assert_eq!(header_text(&h, "x-tabbed", 256).as_deref(), Some("ab"));
        assert_eq!(header_text(&h, "x-long", 4).as_deref(), Some("abcd"));
        assert_eq!(header_text(&h, "x-missing", 4), None);
        let key = key_format::generate(&mut rand::rngs::OsRng, "kw", "prod").unwrap();
        h.insert(
            "x-keyed",
            format!("curl {}", key.plain.expose()).parse().unwrap(),
        );
        assert_eq!(
            header_text(&h, "x-keyed", 256).as_deref(),
            Some("curl <redacted>")
        );
        assert_eq!(header_text(&h, "x-keyed", 8).as_deref(), Some("curl <re"));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for v in ["Bearer abc", "bearer abc", "BEARER  abc ", " bEaReR abc"] {
            assert_eq!(bearer_credentials(v), Some("abc"), "{v}");
        }
        for v in ["Basic abc", "Bearerabc", "Bearer ", "Bearer", "abc", ""] {
            assert_eq!(bearer_credentials(v), None, "{v}");
        }
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", "1.2.3.4, 10.0.0.9".parse().unwrap());
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let stranger: IpAddr = "8.8.8.8".parse().unwrap();
        assert_eq!(
            client_ip(Some(proxy), &h, &trusted),
            Some("1.2.3.4".parse().unwrap())
        );
        assert_eq!(client_ip(Some(stranger), &h, &trusted), Some(stranger));
        assert_eq!(
            client_ip(Some(proxy), &HeaderMap::new(), &trusted),
            Some(proxy)
        );
    }
}
