//! The gateway map for `/v1/auth` (nginx `auth_request`, Traefik ForwardAuth, Envoy
//! ext_authz): which scope (and environment) a method and path need.
//!
//! ```toml
//! gateway = "nginx"                     # or "traefik", "envoy": where the method and URI are
//! trusted_callers = ["127.0.0.1/32"]   # may ask without a token
//! unmatched = "deny"                    # or "allow": any valid key, no scope
//!
//! [[caller]]                            # callers of another kind than `gateway`
//! networks = ["10.0.6.0/24"]
//! gateway = "traefik"
//! trusted = true                        # may ask without a token (default false)
//!
//! [[route]]
//! methods = ["POST", "PUT"]             # any method when absent
//! path = "/deploy/*"                    # exact, or a prefix ending in `*`
//! scope = "deploy:write"                # any valid key when absent
//! environment = "prod"                  # optional
//! ```

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::scope::Scope;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Upper-case methods; empty means any.
    pub methods: Vec<String>,
    pub path: PathPattern,
    pub scope: Option<Scope>,
    pub environment: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathPattern {
    Exact(String),
    Prefix(String),
}

/// The kind of gateway that calls `/v1/auth`, which says where the client's method and
/// URI are. Each kind's headers are the only ones read for it: a client behind Traefik can
/// add `X-Original-URI`, which Traefik passes on untouched, so a Traefik caller's
/// `X-Original-URI` must never be believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GatewayKind {
    /// nginx `auth_request`: `X-Original-Method`, `X-Original-URI`, `X-Real-IP`.
    Nginx,
    /// Traefik ForwardAuth (and Caddy `forward_auth`): `X-Forwarded-Method`,
    /// `X-Forwarded-Uri`, and the last `X-Forwarded-For` entry.
    Traefik,
    /// Envoy HTTP ext_authz: the request's own method, and the original path below
    /// `/v1/auth` (`path_prefix`); `X-Real-IP` when the gateway adds it.
    Envoy,
}

impl GatewayKind {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "nginx" => Some(Self::Nginx),
            "traefik" => Some(Self::Traefik),
            "envoy" => Some(Self::Envoy),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nginx => "nginx",
            Self::Traefik => "traefik",
            Self::Envoy => "envoy",
        }
    }
}

impl std::fmt::Display for GatewayKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Callers (by address) of another kind than the map's, and whether they are trusted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub networks: Vec<IpNet>,
    pub kind: GatewayKind,
    /// May ask without a token.
    pub trusted: bool,
}

/// Who is asking, as the map sees the peer address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallerView {
    /// `None` only without a map, where the method and URI decide nothing.
    pub kind: Option<GatewayKind>,
    pub trusted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayMap {
    pub routes: Vec<Route>,
    /// The kind of every caller that no `callers` entry names. A map file must set it;
    /// only the default (no map) has none.
    pub kind: Option<GatewayKind>,
    /// Callers that may ask without a token; they are of kind `kind`.
    pub trusted_callers: Vec<IpNet>,
    /// Callers of their own kind; the first entry that holds the peer decides its kind.
    pub callers: Vec<Caller>,
    /// Whether a request no route matches passes with any valid key.
    pub allow_unmatched: bool,
}

impl Default for GatewayMap {
    /// No map: every request needs a valid key and nothing more.
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            kind: None,
            trusted_callers: Vec::new(),
            callers: Vec::new(),
            allow_unmatched: true,
        }
    }
}

/// What a request needs, or why it cannot be judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Need<'a> {
    /// A valid key with this scope (if any) in this environment (if any).
    Key {
        scope: Option<&'a Scope>,
        environment: Option<&'a str>,
    },
    /// No route covers the request and the map denies what it does not cover.
    Unmapped,
    /// The path has dot segments or encoded separators, which a backend might resolve
    /// differently from the map: refused rather than guessed.
    Suspicious,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMap {
    gateway: Option<String>,
    #[serde(default)]
    trusted_callers: Vec<String>,
    unmatched: Option<String>,
    #[serde(default)]
    caller: Vec<FileCaller>,
    #[serde(default)]
    route: Vec<FileRoute>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCaller {
    networks: Vec<String>,
    gateway: String,
    #[serde(default)]
    trusted: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoute {
    #[serde(default)]
    methods: Vec<String>,
    path: String,
    scope: Option<String>,
    environment: Option<String>,
}

impl GatewayMap {
    /// Parses a map; every problem is reported, each naming its route.
    pub fn from_toml(text: &str) -> Result<Self, Vec<String>> {
        let file: FileMap = toml::from_str(text).map_err(|e| vec![e.message().to_owned()])?;
        let mut problems = Vec::new();
        let kind = match file.gateway.as_deref() {
            None => {
                problems.push(format!(
                    "gateway: missing; set it to the kind of gateway that calls /v1/auth ({KINDS}), \
                     which decides the headers the client's method and URI are read from"
                ));
                None
            }
            Some(k) => GatewayKind::parse(k).or_else(|| {
                problems.push(format!("gateway: {k:?} must be one of {KINDS}"));
                None
            }),
        };
        let mut trusted_callers = Vec::new();
        for c in &file.trusted_callers {
            match network(c) {
                Some(n) => trusted_callers.push(n),
                None => problems.push(format!("trusted_callers: {c:?} is not a CIDR or address")),
            }
        }
        let mut callers = Vec::new();
        for (i, c) in file.caller.iter().enumerate() {
            let at = format!("caller {}", i + 1);
            let mut networks = Vec::new();
            for n in &c.networks {
                match network(n) {
                    Some(n) => networks.push(n),
                    None => problems.push(format!("{at}: {n:?} is not a CIDR or address")),
                }
            }
            if c.networks.is_empty() {
                problems.push(format!("{at}: networks is empty"));
            }
            match GatewayKind::parse(&c.gateway) {
                Some(kind) => callers.push(Caller {
                    networks,
                    kind,
                    trusted: c.trusted,
                }),
                None => problems.push(format!(
                    "{at}: gateway {:?} must be one of {KINDS}",
                    c.gateway
                )),
            }
        }
        let allow_unmatched = match file.unmatched.as_deref() {
            None | Some("deny") => false,
            Some("allow") => true,
            Some(other) => {
                problems.push(format!(
                    "unmatched: {other:?} must be \"deny\" or \"allow\""
                ));
                false
            }
        };
        let mut routes = Vec::new();
        for (i, r) in file.route.iter().enumerate() {
            let at = format!("route {} ({})", i + 1, r.path);
            let mut methods = Vec::new();
            for m in &r.methods {
                if m.is_empty() || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                    problems.push(format!("{at}: method {m:?} is not an HTTP method"));
                }
                methods.push(m.to_ascii_uppercase());
            }
            let path = if !r.path.starts_with('/') {
                problems.push(format!("{at}: path must start with /"));
                continue;
            } else if let Some(prefix) = r.path.strip_suffix('*') {
                PathPattern::Prefix(prefix.to_owned())
            } else if r.path.contains('*') {
                problems.push(format!("{at}: `*` may only end the path"));
                continue;
            } else {
                PathPattern::Exact(r.path.clone())
            };
            let scope = match r.scope.as_deref().map(Scope::requested).transpose() {
                Ok(s) => s,
                Err(e) => {
                    problems.push(format!("{at}: scope: {e}"));
                    None
                }
            };
            if let Some(env) = &r.environment {
                if let Err(e) = crate::validate::environment(env) {
                    problems.push(format!("{at}: environment: {}", e.message));
                }
            }
            routes.push(Route {
                methods,
                path,
                scope,
                environment: r.environment.clone(),
            });
        }
        if problems.is_empty() {
            Ok(Self {
                routes,
                kind,
                trusted_callers,
                callers,
                allow_unmatched,
            })
        } else {
            Err(problems)
        }
    }

    /// The peer's kind and trust: the first `[[caller]]` entry that holds it names its
    /// kind, else the map's `gateway`; it is trusted when that entry says so or
    /// `trusted_callers` lists it.
    pub fn caller(&self, peer: IpAddr) -> CallerView {
        let entry = self
            .callers
            .iter()
            .find(|c| c.networks.iter().any(|n| n.contains(&peer)));
        let listed = self.trusted_callers.iter().any(|n| n.contains(&peer));
        CallerView {
            kind: entry.map(|c| c.kind).or(self.kind),
            trusted: listed || entry.is_some_and(|c| c.trusted),
        }
    }

    /// Whether the method and URI can change the answer. Without a map they cannot:
    /// every request needs a valid key and nothing more.
    pub fn decides_by_path(&self) -> bool {
        !(self.routes.is_empty() && self.allow_unmatched)
    }

    /// What `method` on `uri` (path and query, as the gateway saw it) needs. The first
    /// route that matches decides.
    pub fn need(&self, method: &str, uri: &str) -> Need<'_> {
        let path = uri.split(['?', '#']).next().unwrap_or("");
        if is_suspicious(path) {
            return Need::Suspicious;
        }
        let route = self.routes.iter().find(|r| {
            (r.methods.is_empty() || r.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
                && match &r.path {
                    PathPattern::Exact(p) => p == path,
                    PathPattern::Prefix(p) => path.starts_with(p.as_str()),
                }
        });
        match route {
            Some(r) => Need::Key {
                scope: r.scope.as_ref(),
                environment: r.environment.as_deref(),
            },
            None if self.allow_unmatched => Need::Key {
                scope: None,
                environment: None,
            },
            None => Need::Unmapped,
        }
    }
}

const KINDS: &str = "\"nginx\", \"traefik\" or \"envoy\"";

fn network(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
        .ok()
}

fn is_suspicious(path: &str) -> bool {
    let lower = path.to_ascii_lowercase();
    !path.starts_with('/')
        || path.split('/').any(|seg| seg == "." || seg == "..")
        || lower.contains("%2e")
        || lower.contains("%2f")
        || lower.contains("%5c")
        || path.contains('\\')
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = r#"
        gateway = "nginx"
        trusted_callers = ["127.0.0.1/32", "::1"]
        [[route]]
        methods = ["post", "PUT"]
        path = "/deploy/*"
        scope = "deploy:write"
        environment = "prod"
        [[route]]
        path = "/deploy/*"
        scope = "deploy:read"
        [[route]]
        path = "/health"
    "#;

    #[test]
    fn first_matching_route_decides_and_unmatched_is_denied() {
        let m = GatewayMap::from_toml(MAP).unwrap();
        assert_eq!(m.trusted_callers.len(), 2);
        let write = m.need("POST", "/deploy/app?force=1");
        assert!(
            matches!(write, Need::Key { scope: Some(s), environment: Some("prod") } if s.to_string() == "deploy:write")
        );
        let read = m.need("GET", "/deploy/app");
        assert!(
            matches!(read, Need::Key { scope: Some(s), environment: None } if s.to_string() == "deploy:read")
        );
        assert_eq!(
            m.need("GET", "/health"),
            Need::Key {
                scope: None,
                environment: None
            }
        );
        assert_eq!(m.need("GET", "/health/x"), Need::Unmapped);
        assert_eq!(m.need("GET", "/other"), Need::Unmapped);
    }

    #[test]
    fn dot_segments_and_encoded_separators_are_refused() {
        let m = GatewayMap::from_toml(MAP).unwrap();
        for uri in [
            "/deploy/../admin",
            "/deploy/./x",
            "/deploy/%2e%2e/admin",
            "/deploy%2Fx",
            "/deploy\\x",
            "deploy",
        ] {
            assert_eq!(m.need("GET", uri), Need::Suspicious, "{uri}");
        }
    }

    #[test]
    fn bad_maps_report_every_problem() {
        let err = GatewayMap::from_toml(
            r#"
            trusted_callers = ["nope"]
            unmatched = "maybe"
            [[route]]
            path = "deploy"
            [[route]]
            path = "/a/*/b"
            [[route]]
            path = "/x"
            scope = "Bad Scope"
            methods = ["G3T"]
            "#,
        )
        .unwrap_err();
        assert_eq!(err.len(), 7, "{err:?}");
        assert!(err[0].starts_with("gateway: missing"), "{err:?}");
        assert!(
            GatewayMap::from_toml("[[route]]\npath = \"/x\"\nscopes = \"a\"").unwrap_err()[0]
                .contains("unknown field")
        );
    }

    #[test]
    fn callers_take_the_kind_of_their_entry_or_of_the_map() {
        let m = GatewayMap::from_toml(
            r#"
            gateway = "nginx"
            trusted_callers = ["10.0.5.0/24"]
            [[caller]]
            networks = ["10.0.6.0/24", "10.0.7.1"]
            gateway = "traefik"
            trusted = true
            [[caller]]
            networks = ["10.0.8.0/24"]
            gateway = "envoy"
            "#,
        )
        .unwrap();
        let at = |ip: &str| m.caller(ip.parse().unwrap());
        let view = |kind, trusted| CallerView {
            kind: Some(kind),
            trusted,
        };
        assert_eq!(at("10.0.5.9"), view(GatewayKind::Nginx, true));
        assert_eq!(at("10.0.6.9"), view(GatewayKind::Traefik, true));
        assert_eq!(at("10.0.7.1"), view(GatewayKind::Traefik, true));
        assert_eq!(at("10.0.8.9"), view(GatewayKind::Envoy, false));
        assert_eq!(at("192.0.2.1"), view(GatewayKind::Nginx, false));
        assert!(m.decides_by_path());
        assert_eq!(
            GatewayMap::default()
                .caller("10.0.5.9".parse().unwrap())
                .kind,
            None
        );
        assert!(!GatewayMap::default().decides_by_path());
        let err = GatewayMap::from_toml(
            "gateway = \"haproxy\"\n[[caller]]\nnetworks = []\ngateway = \"x\"",
        )
        .unwrap_err();
        assert_eq!(err.len(), 3, "{err:?}");
    }

    #[test]
    fn no_map_allows_any_valid_key() {
        assert_eq!(
            GatewayMap::default().need("DELETE", "/anything"),
            Need::Key {
                scope: None,
                environment: None
            }
        );
    }
}
