//! The gateway map for `/v1/auth` (nginx `auth_request`, Traefik ForwardAuth, Envoy
//! ext_authz): which scope (and environment) a method and path need.
//!
//! ```toml
//! trusted_callers = ["127.0.0.1/32"]   # may ask without a token
//! unmatched = "deny"                    # or "allow": any valid key, no scope
//!
//! [[route]]
//! methods = ["POST", "PUT"]             # any method when absent
//! path = "/deploy/*"                    # exact, or a prefix ending in `*`
//! scope = "deploy:write"                # any valid key when absent
//! environment = "prod"                  # optional
//! ```

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayMap {
    pub routes: Vec<Route>,
    pub trusted_callers: Vec<IpNet>,
    /// Whether a request no route matches passes with any valid key.
    pub allow_unmatched: bool,
}

impl Default for GatewayMap {
    /// No map: every request needs a valid key and nothing more.
    fn default() -> Self {
        Self {
            routes: Vec::new(),
            trusted_callers: Vec::new(),
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
    #[serde(default)]
    trusted_callers: Vec<String>,
    unmatched: Option<String>,
    #[serde(default)]
    route: Vec<FileRoute>,
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
        let mut trusted_callers = Vec::new();
        for c in &file.trusted_callers {
            match c
                .parse::<IpNet>()
                .or_else(|_| c.parse::<std::net::IpAddr>().map(IpNet::from))
            {
                Ok(n) => trusted_callers.push(n),
                Err(_) => problems.push(format!("trusted_callers: {c:?} is not a CIDR or address")),
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
                trusted_callers,
                allow_unmatched,
            })
        } else {
            Err(problems)
        }
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
        assert_eq!(err.len(), 6, "{err:?}");
        assert!(
            GatewayMap::from_toml("[[route]]\npath = \"/x\"\nscopes = \"a\"").unwrap_err()[0]
                .contains("unknown field")
        );
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
