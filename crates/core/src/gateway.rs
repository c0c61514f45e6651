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
//! case_insensitive = true               # this route ignores letter case (default: the map's)
//! ```
//!
//! Paths are compared as RFC 3986 normalises them (percent-encoded unreserved characters
//! decoded, hex upper-cased, repeated slashes collapsed); what stays ambiguous between
//! backends is refused ([`normalize_path`]). `/admin/*` also covers `/admin` itself. A
//! path that would be judged by another route if letter case were ignored is refused
//! too: a backend that ignores case would serve `/ADMIN/x` from its `/admin/` handler.

use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::scope::Scope;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Upper-case methods; empty means any.
    pub methods: Vec<String>,
    /// Normalised as request paths are ([`normalize_path`]).
    pub path: PathPattern,
    pub scope: Option<Scope>,
    pub environment: Option<String>,
    /// Whether this route matches paths whatever their letter case.
    pub case_insensitive: bool,
}

impl Route {
    fn matches(&self, method: &str, path: &str, ignore_case: bool) -> bool {
        let eq = |a: &str, b: &str| {
            if ignore_case {
                a.eq_ignore_ascii_case(b)
            } else {
                a == b
            }
        };
        let starts = |p: &str| path.get(..p.len()).is_some_and(|head| eq(head, p));
        (self.methods.is_empty() || self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
            && match &self.path {
                PathPattern::Exact(p) => eq(path, p),
                // `/admin/*` covers `/admin` too: most backends serve it from the same
                // handler (or redirect it there).
                PathPattern::Prefix(p) => {
                    starts(p)
                        || (p.len() > 1
                            && p.ends_with('/')
                            && p.get(..p.len() - 1).is_some_and(|dir| eq(path, dir)))
                }
            }
    }
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

/// Why a path cannot be compared with the map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathProblem {
    /// It does not start with `/`.
    NotAbsolute,
    /// A `%` not followed by two hex digits.
    BadPercent,
    /// An encoded `/`, `\`, `;` or `%`, or an encoded control character (NUL included):
    /// backends decode these differently, or decode twice.
    EncodedDelimiter,
    /// A raw `\`, `;` (path parameters, which Java servers strip), `#`, space, control
    /// or non-ASCII byte.
    BadCharacter,
    /// A `.` or `..` segment (after decoding), which a backend may resolve or not.
    DotSegment,
}

/// The path of a request as the map compares it: RFC 3986 normalisation (percent-encoded
/// unreserved characters decoded, other percent-encodings upper-cased) with repeated
/// slashes collapsed (so `//admin/x` is `/admin/x`). What stays ambiguous, because
/// backends read it differently, is refused rather than guessed at: dot segments
/// (refused rather than resolved, since a backend that does not resolve them would route
/// `/admin/../public` to its admin handler), `;` path parameters, encoded separators and
/// `%`, control characters, and malformed percent-encodings. Letter case is kept.
pub fn normalize_path(path: &str) -> Result<String, PathProblem> {
    if !path.starts_with('/') {
        return Err(PathProblem::NotAbsolute);
    }
    let bytes = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = |at: usize| bytes.get(at).and_then(|h| (*h as char).to_digit(16));
            let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                return Err(PathProblem::BadPercent);
            };
            let v = u8::try_from(hi * 16 + lo).map_err(|_| PathProblem::BadPercent)?;
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                decoded.push(char::from(v));
            } else if matches!(v, b'/' | b'\\' | b';' | b'%') || v.is_ascii_control() {
                return Err(PathProblem::EncodedDelimiter);
            } else {
                decoded.push('%');
                decoded.push_str(&format!("{v:02X}"));
            }
            i += 3;
            continue;
        }
        if !b.is_ascii_graphic() || matches!(b, b'\\' | b';' | b'#') {
            return Err(PathProblem::BadCharacter);
        }
        decoded.push(char::from(b));
        i += 1;
    }
    let mut out = String::with_capacity(decoded.len());
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        if segment == "." || segment == ".." {
            return Err(PathProblem::DotSegment);
        }
        out.push('/');
        out.push_str(segment);
    }
    if decoded.ends_with('/') || out.is_empty() {
        out.push('/');
    }
    Ok(out)
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
    /// The path cannot be normalised unambiguously (dot segments, `;`, encoded
    /// separators, ...), or would be judged by another route if letter case were
    /// ignored: refused rather than guessed.
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
    case_insensitive: bool,
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
    case_insensitive: Option<bool>,
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
            let (text, prefix) = match r.path.strip_suffix('*') {
                Some(p) => (p, true),
                None => (r.path.as_str(), false),
            };
            let normal = if !text.starts_with('/') {
                problems.push(format!("{at}: path must start with /"));
                continue;
            } else if text.contains('*') {
                problems.push(format!("{at}: `*` may only end the path"));
                continue;
            } else {
                match normalize_path(text) {
                    Ok(p) => p,
                    Err(e) => {
                        problems.push(format!(
                            "{at}: path is not one requests can match ({e:?}); write it \
                             without dot segments, `;`, `\\`, encoded separators or `%25`"
                        ));
                        continue;
                    }
                }
            };
            let path = if prefix {
                PathPattern::Prefix(normal)
            } else {
                PathPattern::Exact(normal)
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
                case_insensitive: r.case_insensitive.unwrap_or(file.case_insensitive),
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
    ///
    /// The path is normalised first ([`normalize_path`]); one that cannot be is
    /// `Suspicious`. So is one that another route would judge if letter case were ignored:
    /// a backend that ignores case would serve it from that route's handler.
    pub fn need(&self, method: &str, uri: &str) -> Need<'_> {
        let raw = uri.split('?').next().unwrap_or("");
        let Ok(path) = normalize_path(raw) else {
            return Need::Suspicious;
        };
        let path = path.as_str();
        let chosen = self
            .routes
            .iter()
            .position(|r| r.matches(method, path, r.case_insensitive));
        let folded = self
            .routes
            .iter()
            .position(|r| r.matches(method, path, true));
        if chosen != folded {
            return Need::Suspicious;
        }
        match chosen.and_then(|i| self.routes.get(i)) {
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
    fn paths_are_normalised_before_matching() {
        let ok = |raw: &str| normalize_path(raw).unwrap();
        assert_eq!(ok("/%61dmin/x"), "/admin/x");
        assert_eq!(ok("//admin//x"), "/admin/x");
        assert_eq!(ok("/admin/"), "/admin/");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("//"), "/");
        assert_eq!(ok("/%7e%2D%5f%2e%41/"), "/~-_.A/");
        assert_eq!(ok("/caf%c3%a9%20x"), "/caf%C3%A9%20x");
        assert_eq!(ok("/a..b/.x"), "/a..b/.x");
        let bad = |raw: &str| normalize_path(raw).unwrap_err();
        for (raw, problem) in [
            ("admin", PathProblem::NotAbsolute),
            ("", PathProblem::NotAbsolute),
            ("/a%zz", PathProblem::BadPercent),
            ("/a%4", PathProblem::BadPercent),
            ("/a%", PathProblem::BadPercent),
            ("/admin%2fx", PathProblem::EncodedDelimiter),
            ("/admin%5Cx", PathProblem::EncodedDelimiter),
            ("/admin%3b/x", PathProblem::EncodedDelimiter),
            ("/admin%00", PathProblem::EncodedDelimiter),
            ("/admin%0a", PathProblem::EncodedDelimiter),
            ("/%2561dmin", PathProblem::EncodedDelimiter),
            ("/admin;/x", PathProblem::BadCharacter),
            ("/admin;jsessionid=1", PathProblem::BadCharacter),
            ("/admin\\x", PathProblem::BadCharacter),
            ("/public#/../admin", PathProblem::BadCharacter),
            ("/a b", PathProblem::BadCharacter),
            ("/caf\u{e9}", PathProblem::BadCharacter),
            ("/a\u{0}", PathProblem::BadCharacter),
            ("/public/../admin", PathProblem::DotSegment),
            ("/public/%2e%2E/admin", PathProblem::DotSegment),
            ("/./admin", PathProblem::DotSegment),
            ("/admin/.", PathProblem::DotSegment),
        ] {
            assert_eq!(bad(raw), problem, "{raw:?}");
        }
    }

    const ADMIN: &str = r#"
        gateway = "nginx"
        [[route]]
        path = "/admin/*"
        scope = "admin:write"
        [[route]]
        path = "/Reports/*"
        scope = "reports:read"
        case_insensitive = true
        [[route]]
        path = "/*"
        scope = "public:read"
    "#;

    fn scope_of(m: &GatewayMap, uri: &str) -> Option<String> {
        match m.need("GET", uri) {
            Need::Key { scope, .. } => scope.map(|s| s.to_string()),
            other => Some(format!("{other:?}")),
        }
    }

    #[test]
    fn spellings_of_a_path_are_judged_by_the_same_route() {
        let m = GatewayMap::from_toml(ADMIN).unwrap();
        for uri in [
            "/admin/x",
            "/%61dmin/x",
            "//admin/x",
            "/admin//x",
            "/admin",
            "/admin/",
            "/%61%64%6D%69%6E?x=1",
        ] {
            assert_eq!(scope_of(&m, uri).as_deref(), Some("admin:write"), "{uri}");
        }
        for uri in ["/adminx", "/public/admin/x", "/", "/x?/admin/"] {
            assert_eq!(scope_of(&m, uri).as_deref(), Some("public:read"), "{uri}");
        }
        // A case-insensitive route takes every spelling of its case.
        for uri in ["/Reports/q1", "/reports/q1", "/REPORTS", "/%72eports/x"] {
            assert_eq!(scope_of(&m, uri).as_deref(), Some("reports:read"), "{uri}");
        }
        // Elsewhere, a spelling another route would take if case were ignored is refused.
        for uri in [
            "/ADMIN/x",
            "/Admin",
            "/admin;/x",
            "/admin%2Fx",
            "/public/../admin",
        ] {
            assert_eq!(m.need("GET", uri), Need::Suspicious, "{uri}");
        }
        // ... but case that changes nothing is fine.
        assert_eq!(scope_of(&m, "/Public/X").as_deref(), Some("public:read"));

        // The whole map can ignore case.
        let m = GatewayMap::from_toml(&ADMIN.replace(
            "gateway = \"nginx\"",
            "gateway = \"nginx\"\ncase_insensitive = true",
        ))
        .unwrap();
        assert_eq!(scope_of(&m, "/ADMIN/x").as_deref(), Some("admin:write"));
        assert_eq!(scope_of(&m, "/%41dmin").as_deref(), Some("admin:write"));
    }

    #[test]
    fn route_paths_are_normalised_and_checked() {
        let m = GatewayMap::from_toml(
            "gateway = \"envoy\"\n[[route]]\npath = \"//%61pi//v1/*\"\nscope = \"api:x\"",
        )
        .unwrap();
        assert_eq!(m.routes[0].path, PathPattern::Prefix("/api/v1/".to_owned()));
        let err = GatewayMap::from_toml(
            "gateway = \"envoy\"\n[[route]]\npath = \"/a/../b\"\n[[route]]\npath = \"/a;b\"",
        )
        .unwrap_err();
        assert_eq!(err.len(), 2, "{err:?}");
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
