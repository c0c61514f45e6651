//! keywarden-client: the typed HTTP client of the `/v1` API, used by the CLI.

use std::fmt;
use std::time::Duration;

use keywarden_proto::{
    ArchiveRequest, ArchiveView, AuditChainView, AuditPage, CheckpointRequest, CheckpointView,
    CreateKeyRequest, CreateTokenRequest, CreatedKey, CreatedToken, ErrorBody, Health, KeyList,
    KeyView, QuarantineView, RotateRequest, RotatedKey, StateChangeRequest, TokenList, TokenView,
    UsageList, VerifyRequest, VerifyResponse,
};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The cause is printed after it (it is the error's source), not in it.
    #[error(
        "cannot reach keywarden at {server}; is `keywarden serve` running there? Point the \
         CLI at it with --server URL or KEYWARDEN_SERVER (by default it reads the address \
         `serve` recorded in its data directory, else uses http://127.0.0.1:8470)"
    )]
    Connect {
        server: String,
        source: reqwest::Error,
    },
    #[error("{} ({status}): {}", .body.error.code, .body.error.message)]
    Api { status: StatusCode, body: ErrorBody },
    #[error("unexpected answer from the server ({status}): {detail}")]
    Unexpected { status: StatusCode, detail: String },
}

impl ClientError {
    /// The API's error code, when the server answered with one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Self::Api { body, .. } => Some(&body.error.code),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, ClientError>;

/// The query of `GET /v1/events`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EventsQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wait: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events: Option<String>,
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// For streamed answers (exports): no limit on the whole transfer, only on silence.
    streaming: reqwest::Client,
    server: String,
    token: Option<String>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("server", &self.server)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// Filters of `GET /v1/keys`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeyQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct PageQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// Filters of `GET /v1/audit` and `GET /v1/audit/export`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub action: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
}

/// A streamed answer, read a chunk or a line at a time (constant memory).
pub struct Stream {
    resp: reqwest::Response,
    server: String,
    buf: Vec<u8>,
    /// Where the unread part of `buf` starts.
    pos: usize,
    done: bool,
}

impl Stream {
    /// The next chunk of bytes as it arrived; `None` at the end. A transfer cut short is an
    /// error, never a quiet end.
    pub async fn chunk(&mut self) -> Result<Option<Vec<u8>>> {
        match self.resp.chunk().await {
            Ok(c) => Ok(c.map(|b| b.to_vec())),
            Err(source) => Err(ClientError::Connect {
                server: self.server.clone(),
                source,
            }),
        }
    }

    /// The next line without its newline; `None` at the end.
    pub async fn line(&mut self) -> Result<Option<String>> {
        loop {
            if let Some(i) = self.buf[self.pos..].iter().position(|b| *b == b'\n') {
                let line = self.buf[self.pos..self.pos + i].to_vec();
                self.pos += i + 1;
                return utf8_line(line).map(Some);
            }
            if self.done {
                if self.pos == self.buf.len() {
                    return Ok(None);
                }
                let line = self.buf[self.pos..].to_vec();
                self.pos = self.buf.len();
                return utf8_line(line).map(Some);
            }
            // Keep only the unread tail before reading on, so the buffer holds at most a
            // line and a chunk.
            self.buf.drain(..self.pos);
            self.pos = 0;
            match self.chunk().await? {
                Some(c) => self.buf.extend_from_slice(&c),
                None => self.done = true,
            }
        }
    }
}

/// The error a non-2xx answer carries: the API's error body, or the start of whatever
/// came instead.
fn refusal(status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => ClientError::Api { status, body },
        Err(_) => ClientError::Unexpected {
            status,
            detail: String::from_utf8_lossy(bytes).chars().take(200).collect(),
        },
    }
}

fn utf8_line(line: Vec<u8>) -> Result<String> {
    String::from_utf8(line).map_err(|e| ClientError::Unexpected {
        status: StatusCode::OK,
        detail: format!("a streamed line is not UTF-8: {e}"),
    })
}

impl Client {
    pub fn new(server: &str, token: Option<String>) -> Result<Self> {
        let connect = |source| ClientError::Connect {
            server: server.to_owned(),
            source,
        };
        let agent = concat!("keywarden-cli/", env!("CARGO_PKG_VERSION"));
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .user_agent(agent)
            .build()
            .map_err(connect)?;
        let streaming = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent(agent)
            .build()
            .map_err(connect)?;
        Ok(Self {
            http,
            streaming,
            server: server.trim_end_matches('/').to_owned(),
            token,
        })
    }

    async fn call<B: Serialize, Q: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: Option<&Q>,
        body: Option<&B>,
    ) -> Result<T> {
        let mut req = self.http.request(method, format!("{}{path}", self.server));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(q) = query {
            req = req.query(q);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await.map_err(|source| ClientError::Connect {
            server: self.server.clone(),
            source,
        })?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(|source| ClientError::Connect {
            server: self.server.clone(),
            source,
        })?;
        if status.is_success() {
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Unexpected {
                status,
                detail: e.to_string(),
            })
        } else {
            Err(refusal(status, &bytes))
        }
    }

    async fn get<Q: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        query: Option<&Q>,
    ) -> Result<T> {
        self.call::<(), Q, T>(Method::GET, path, query, None).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T> {
        self.call::<B, (), T>(Method::POST, path, None, Some(body))
            .await
    }

    pub async fn health(&self) -> Result<Health> {
        self.get::<(), _>("/healthz", None).await
    }

    pub async fn create_key(&self, req: &CreateKeyRequest) -> Result<CreatedKey> {
        self.post("/v1/keys", req).await
    }

    pub async fn list_keys(&self, q: &KeyQuery) -> Result<KeyList> {
        self.get("/v1/keys", Some(q)).await
    }

    pub async fn get_key(&self, id: &str) -> Result<KeyView> {
        self.get::<(), _>(&format!("/v1/keys/{}", seg(id)), None)
            .await
    }

    /// `action` is `suspend`, `resume` or `revoke`.
    pub async fn change_state(
        &self,
        id: &str,
        action: &str,
        reason: Option<String>,
    ) -> Result<KeyView> {
        self.post(
            &format!("/v1/keys/{}/{action}", seg(id)),
            &StateChangeRequest { reason },
        )
        .await
    }

    pub async fn rotate_key(&self, id: &str, req: &RotateRequest) -> Result<RotatedKey> {
        self.post(&format!("/v1/keys/{}/rotate", seg(id)), req)
            .await
    }

    pub async fn key_usage(&self, id: &str, q: &PageQuery) -> Result<UsageList> {
        self.get(&format!("/v1/keys/{}/usage", seg(id)), Some(q))
            .await
    }

    pub async fn verify(&self, req: &VerifyRequest) -> Result<VerifyResponse> {
        self.post("/v1/verify", req).await
    }

    pub async fn create_token(&self, req: &CreateTokenRequest) -> Result<CreatedToken> {
        self.post("/v1/tokens", req).await
    }

    pub async fn list_tokens(&self) -> Result<TokenList> {
        self.get::<(), _>("/v1/tokens", None).await
    }

    pub async fn revoke_token(&self, id: &str) -> Result<TokenView> {
        self.post(
            &format!("/v1/tokens/{}/revoke", seg(id)),
            &serde_json::json!({}),
        )
        .await
    }
}

impl Client {
    pub async fn put_owner(
        &self,
        req: &keywarden_proto::PutOwnerRequest,
    ) -> Result<keywarden_proto::OwnerView> {
        self.post("/v1/owners", req).await
    }

    pub async fn list_owners(&self) -> Result<keywarden_proto::OwnerList> {
        self.get::<(), _>("/v1/owners", None).await
    }

    pub async fn get_owner(&self, identity: &str) -> Result<keywarden_proto::OwnerView> {
        self.get::<(), _>(&format!("/v1/owners/{}", seg(identity)), None)
            .await
    }

    /// `action` is `disable` or `enable`.
    pub async fn set_owner_status(
        &self,
        identity: &str,
        action: &str,
        reason: Option<String>,
    ) -> Result<keywarden_proto::OwnerStatusChange> {
        self.post(
            &format!("/v1/owners/{}/{action}", seg(identity)),
            &StateChangeRequest { reason },
        )
        .await
    }

    pub async fn get_policy(&self) -> Result<keywarden_proto::PolicyView> {
        self.get::<(), _>("/v1/policy", None).await
    }

    pub async fn put_policy(&self, text: &str) -> Result<keywarden_proto::PolicyView> {
        self.call::<_, (), _>(
            Method::PUT,
            "/v1/policy",
            None,
            Some(&keywarden_proto::ApplyPolicyRequest {
                policy: text.to_owned(),
            }),
        )
        .await
    }

    /// What the enforcer would do at `at` (RFC 3339; default now).
    /// What the first enforcer pass under `policy` would do now (nothing is applied).
    pub async fn plan_policy(&self, policy: &str) -> Result<keywarden_proto::EnforcementReport> {
        self.post(
            "/v1/policy/plan",
            &keywarden_proto::ApplyPolicyRequest {
                policy: policy.to_owned(),
            },
        )
        .await
    }

    pub async fn enforce_plan(
        &self,
        at: Option<&str>,
    ) -> Result<keywarden_proto::EnforcementReport> {
        let q: Vec<(&str, &str)> = at.map(|a| ("at", a)).into_iter().collect();
        self.get("/v1/enforce/plan", Some(&q)).await
    }

    pub async fn enforce_now(&self) -> Result<keywarden_proto::EnforcementReport> {
        self.post("/v1/enforce", &serde_json::json!({})).await
    }

    pub async fn audit_list(&self, q: &AuditQuery) -> Result<AuditPage> {
        self.get("/v1/audit", Some(q)).await
    }

    pub async fn audit_chain(&self) -> Result<AuditChainView> {
        self.get::<(), _>("/v1/audit/chain", None).await
    }

    pub async fn audit_checkpoint(&self, seq: Option<i64>) -> Result<CheckpointView> {
        self.post("/v1/audit/checkpoints", &CheckpointRequest { seq })
            .await
    }

    pub async fn audit_archive(&self, req: &ArchiveRequest) -> Result<ArchiveView> {
        self.post("/v1/audit/archives", req).await
    }

    /// `GET /v1/events`: the key events after `after`, waiting up to `wait` (`30s`) when
    /// none is new.
    pub async fn events(&self, q: &EventsQuery) -> Result<keywarden_proto::EventPage> {
        self.get("/v1/events", Some(q)).await
    }

    /// `POST /v1/services/{id}/ack`: a pull service applied every event up to `seq`.
    pub async fn ack(&self, service: &str, seq: i64) -> Result<keywarden_proto::AckResponse> {
        self.post(
            &format!("/v1/services/{}/ack", seg(service)),
            &keywarden_proto::AckRequest { seq },
        )
        .await
    }

    pub async fn audit_quarantine(&self) -> Result<QuarantineView> {
        self.post("/v1/audit/quarantine", &serde_json::json!({}))
            .await
    }

    /// `GET /v1/audit/export`, streamed.
    pub async fn audit_export(&self, q: &AuditQuery) -> Result<Stream> {
        self.stream("/v1/audit/export", q).await
    }

    /// `GET /v1/usage/chain`: the usage log's head and the prefixes retention removed.
    pub async fn usage_chain(&self) -> Result<keywarden_proto::UsageChainView> {
        self.get::<(), _>("/v1/usage/chain", None).await
    }

    /// `GET /v1/usage/chain/export`, streamed: one JSON line per batch (with its events)
    /// or stray event (`keywarden_core::usage_chain::ChainLine`).
    pub async fn usage_chain_export(&self) -> Result<Stream> {
        self.stream("/v1/usage/chain/export", &[] as &[(&str, &str)])
            .await
    }

    async fn stream<Q: Serialize + ?Sized>(&self, path: &str, q: &Q) -> Result<Stream> {
        let mut req = self
            .streaming
            .get(format!("{}{path}", self.server))
            .query(q);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|source| ClientError::Connect {
            server: self.server.clone(),
            source,
        })?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.unwrap_or_default();
            return Err(refusal(status, &bytes));
        }
        Ok(Stream {
            resp,
            server: self.server.clone(),
            buf: Vec::new(),
            pos: 0,
            done: false,
        })
    }
}

/// An exported entry as the chain walk reads it. A hash that is not 64 hex characters
/// becomes one no entry can have, so the walk names that entry.
pub fn sealed_entry(
    v: &keywarden_proto::AuditEntryView,
) -> keywarden_core::audit_chain::SealedEntry {
    use keywarden_core::audit_chain::{from_hex, SealedEntry};
    use keywarden_core::model::{Actor, AuditEntry};
    SealedEntry {
        seq: v.seq,
        entry: AuditEntry {
            time: v.time,
            actor: Actor {
                id: v.actor.clone(),
                name: v.actor_name.clone(),
                source_ip: v.source_ip.clone(),
                user_agent: v.user_agent.clone(),
                request_id: v.request_id.clone(),
            },
            action: v.action.clone(),
            target: v.target.clone(),
            reason: v.reason.clone(),
            details: v.details.to_string(),
        },
        prev_hash: from_hex(&v.prev_hash).unwrap_or([0xff; 32]),
        hash: from_hex(&v.hash).unwrap_or([0xff; 32]),
    }
}

/// Ids are base62, but a user may type anything: keep it one path segment.
fn seg(id: &str) -> String {
    id.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

impl Client {
    pub async fn create_service(
        &self,
        req: &keywarden_proto::CreateServiceRequest,
    ) -> Result<keywarden_proto::CreatedService> {
        self.post("/v1/services", req).await
    }

    pub async fn list_services(&self) -> Result<keywarden_proto::ServiceList> {
        self.get::<(), _>("/v1/services", None).await
    }

    pub async fn get_service(&self, id: &str) -> Result<keywarden_proto::ServiceView> {
        self.get::<(), _>(&format!("/v1/services/{}", seg(id)), None)
            .await
    }

    pub async fn remove_service(&self, id: &str) -> Result<()> {
        let mut req = self
            .http
            .delete(format!("{}/v1/services/{}", self.server, seg(id)));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.map_err(|source| ClientError::Connect {
            server: self.server.clone(),
            source,
        })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let bytes = resp.bytes().await.map_err(|source| ClientError::Connect {
            server: self.server.clone(),
            source,
        })?;
        Err(refusal(status, &bytes))
    }

    pub async fn test_service(&self, id: &str) -> Result<keywarden_proto::ServiceTestResult> {
        self.post(
            &format!("/v1/services/{}/test", seg(id)),
            &serde_json::json!({}),
        )
        .await
    }

    pub async fn list_alerts(&self, q: &AlertQuery) -> Result<keywarden_proto::AlertList> {
        self.get("/v1/alerts", Some(q)).await
    }

    pub async fn get_alert(&self, seq: &str) -> Result<keywarden_proto::AlertView> {
        self.get::<(), _>(&format!("/v1/alerts/{}", seg(seq)), None)
            .await
    }

    /// `action`: `ack` or `resolve`.
    pub async fn move_alert(
        &self,
        seq: &str,
        action: &str,
        reason: Option<String>,
    ) -> Result<keywarden_proto::AlertView> {
        self.post(
            &format!("/v1/alerts/{}/{action}", seg(seq)),
            &keywarden_proto::StateChangeRequest { reason },
        )
        .await
    }
}

/// The query of `GET /v1/keys/{id}/usage/stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct KeyStatsQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bucket: Option<String>,
}

/// The query of `GET /v1/usage/stats`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UsageStatsQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group_by: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// The query of `GET /v1/usage/search`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct UsageSearchQuery {
    pub source: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub until: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

impl Client {
    pub async fn key_usage_stats(
        &self,
        id: &str,
        q: &KeyStatsQuery,
    ) -> Result<keywarden_proto::KeyUsageStats> {
        self.get(&format!("/v1/keys/{}/usage/stats", seg(id)), Some(q))
            .await
    }

    pub async fn usage_stats(&self, q: &UsageStatsQuery) -> Result<keywarden_proto::UsageStats> {
        self.get("/v1/usage/stats", Some(q)).await
    }

    pub async fn usage_search(&self, q: &UsageSearchQuery) -> Result<keywarden_proto::UsageSearch> {
        self.get("/v1/usage/search", Some(q)).await
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct AlertQuery {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

impl Client {
    pub async fn identify_keys(
        &self,
        req: &keywarden_proto::IdentifyRequest,
    ) -> Result<keywarden_proto::IdentifyResponse> {
        self.post("/v1/keys/identify", req).await
    }

    pub async fn import_shadow_keys(
        &self,
        req: &keywarden_proto::ImportShadowKeys,
    ) -> Result<keywarden_proto::ShadowImportResult> {
        self.post("/v1/shadow-keys", req).await
    }

    pub async fn list_shadow_keys(&self) -> Result<keywarden_proto::ShadowKeyList> {
        self.get::<(), _>("/v1/shadow-keys", None).await
    }
}
