//! The one HTTP client for requests keywarden makes (webhooks). It refuses private,
//! loopback and link-local addresses (cloud metadata included) unless the configuration
//! allows them: a webhook URL is user input, and without this it would let anyone who
//! may register a service probe the inside of our network. The check runs on resolved
//! addresses, so a public name that resolves to a private address is refused too, and
//! redirects are not followed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use keywarden_core::webhook::is_public;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum OutboundError {
    #[error("only http and https URLs are allowed")]
    Scheme,
    #[error("the URL must not carry a user name or password")]
    Credentials,
    #[error("the URL has no host")]
    NoHost,
    #[error(
        "{0} is a private, loopback or otherwise internal address; allow it with --outbound-allow"
    )]
    Refused(IpAddr),
    #[error("{0}")]
    Request(String),
    #[error("outbound proxy: {0}")]
    Proxy(String),
}

/// Which addresses outbound requests may reach besides public ones.
#[derive(Debug, Clone, Default)]
struct Guard {
    allow: Arc<Vec<IpNet>>,
}

impl Guard {
    fn check(&self, ip: IpAddr) -> Result<(), OutboundError> {
        // An IPv4-mapped address is judged, and allowed, as the IPv4 address it is.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if is_public(ip) || self.allow.iter().any(|n| n.contains(&ip)) {
            Ok(())
        } else {
            Err(OutboundError::Refused(ip))
        }
    }
}

/// Resolves names with the system resolver, then drops addresses the guard refuses.
struct GuardedResolver(Guard);

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.0.clone();
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut refused = None;
            let ok: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match guard.check(a.ip()) {
                    Ok(()) => true,
                    Err(e) => {
                        refused = Some(e);
                        false
                    }
                })
                .collect();
            if ok.is_empty() {
                let e: Box<dyn std::error::Error + Send + Sync> = match refused {
                    Some(e) => Box::new(e),
                    None => format!("{host} has no address").into(),
                };
                return Err(e);
            }
            let addrs: Addrs = Box::new(ok.into_iter());
            Ok(addrs)
        })
    }
}

#[derive(Clone)]
pub struct Outbound {
    client: reqwest::Client,
    guard: Guard,
    /// With a proxy the target's name is resolved by the proxy, not by our resolver, so
    /// `post` resolves and checks it itself first.
    proxied: bool,
}

/// The answer to a request: the status, or why there was none.
pub type Answer = Result<reqwest::StatusCode, OutboundError>;

impl Outbound {
    /// `proxy`: send every request through this HTTP proxy (`serve --outbound-proxy`).
    /// Without it no proxy is used, whatever `HTTP_PROXY`, `HTTPS_PROXY` or `ALL_PROXY`
    /// say: a proxy picked up from the environment would reach the targets the guard
    /// refuses, since the proxy, not our resolver, would resolve them.
    pub fn new(
        allow: Vec<IpNet>,
        timeout: Duration,
        proxy: Option<&str>,
    ) -> Result<Self, OutboundError> {
        let guard = Guard {
            allow: Arc::new(allow),
        };
        let builder = match proxy {
            None => reqwest::Client::builder().no_proxy(),
            Some(p) => {
                let url = Url::parse(p).map_err(|e| OutboundError::Proxy(e.to_string()))?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(OutboundError::Proxy(
                        "the proxy URL must be http:// or https://".to_owned(),
                    ));
                }
                let proxy =
                    reqwest::Proxy::all(url).map_err(|e| OutboundError::Proxy(e.to_string()))?;
                reqwest::Client::builder().proxy(proxy)
            }
        };
        let client = builder
            .dns_resolver(Arc::new(GuardedResolver(guard.clone())))
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("keywarden/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OutboundError::Request(e.to_string()))?;
        Ok(Self {
            client,
            guard,
            proxied: proxy.is_some(),
        })
    }

    /// Checks what can be checked before sending: the scheme, no credentials, and a
    /// literal IP address against the guard (names are checked when resolved).
    pub fn check_url(&self, url: &Url) -> Result<(), OutboundError> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(OutboundError::Scheme);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(OutboundError::Credentials);
        }
        match url.host() {
            None => Err(OutboundError::NoHost),
            Some(url::Host::Ipv4(ip)) => self.guard.check(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.guard.check(IpAddr::V6(ip)),
            Some(url::Host::Domain(_)) => Ok(()),
        }
    }

    /// Through a proxy: resolves the target's name here and refuses it unless every
    /// address passes the guard (the proxy resolves it again; a name whose answers
    /// differ between the two lookups is the one gap, documented in docs/services.md).
    async fn check_resolved(&self, url: &Url) -> Result<(), OutboundError> {
        let Some(url::Host::Domain(host)) = url.host() else {
            return Ok(());
        };
        let addrs = tokio::net::lookup_host((host, 0))
            .await
            .map_err(|e| OutboundError::Request(format!("cannot resolve {host}: {e}")))?;
        let mut any = false;
        for a in addrs {
            self.guard.check(a.ip())?;
            any = true;
        }
        if any {
            Ok(())
        } else {
            Err(OutboundError::Request(format!("{host} has no address")))
        }
    }

    /// POSTs `body` with `headers`; the response body is not read past a small prefix.
    pub async fn post(&self, url: &str, headers: &[(&str, String)], body: Vec<u8>) -> Answer {
        let url = Url::parse(url).map_err(|e| OutboundError::Request(e.to_string()))?;
        self.check_url(&url)?;
        if self.proxied {
            self.check_resolved(&url).await?;
        }
        let mut req = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        for (name, value) in headers {
            req = req.header(*name, value);
        }
        match req.body(body).send().await {
            Ok(resp) => Ok(resp.status()),
            Err(e) => Err(OutboundError::Request(describe(&e))),
        }
    }
}

/// A reqwest error with its causes, which say what actually went wrong (the guard's
/// refusal, a refused connection, a timeout), without the URL (it may carry a token in
/// its query).
fn describe(e: &reqwest::Error) -> String {
    let mut parts = vec![if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "cannot connect".to_owned()
    } else {
        "request failed".to_owned()
    }];
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbound(allow: &[&str]) -> Outbound {
        Outbound::new(
            allow.iter().map(|a| a.parse().unwrap()).collect(),
            Duration::from_secs(2),
            None,
        )
        .unwrap()
    }

    #[test]
    fn literal_addresses_are_checked_before_sending() {
        let o = outbound(&[]);
        let check = |u: &str| o.check_url(&Url::parse(u).unwrap());
        assert!(matches!(
            check("http://127.0.0.1:9/x"),
            Err(OutboundError::Refused(_))
        ));
        assert!(matches!(
            check("http://169.254.169.254/latest/meta-data"),
            Err(OutboundError::Refused(_))
        ));
        assert!(matches!(
            check("http://[::ffff:10.0.0.1]/"),
            Err(OutboundError::Refused(_))
        ));
        assert_eq!(check("ftp://example.com/"), Err(OutboundError::Scheme));
        assert_eq!(
            check("https://u:p@example.com/"),
            Err(OutboundError::Credentials)
        );
        assert_eq!(check("https://example.com/hook"), Ok(()));
        let allowed = outbound(&["127.0.0.0/8"]);
        assert_eq!(
            allowed.check_url(&Url::parse("http://127.0.0.1:9/x").unwrap()),
            Ok(())
        );
    }

    #[tokio::test]
    async fn names_resolving_to_loopback_are_refused_unless_allowed() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                let _ = sock
                    .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n")
                    .await;
            }
        });
        let url = format!("http://localhost:{port}/hook");
        let refused = outbound(&[]).post(&url, &[], b"{}".to_vec()).await;
        let err = refused.unwrap_err().to_string();
        assert!(err.contains("private, loopback"), "{err}");
        let ok = outbound(&["127.0.0.0/8", "::1/128"])
            .post(&url, &[], b"{}".to_vec())
            .await;
        assert_eq!(ok.unwrap(), reqwest::StatusCode::NO_CONTENT);
    }
}
