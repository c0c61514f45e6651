//! keywarden-client: the typed HTTP client of the `/v1` API, used by the CLI.

use std::fmt;
use std::time::Duration;

use keywarden_proto::{
    CreateKeyRequest, CreateTokenRequest, CreatedKey, CreatedToken, ErrorBody, Health, KeyList,
    KeyView, RotateRequest, RotatedKey, StateChangeRequest, TokenList, TokenView, UsageList,
    VerifyRequest, VerifyResponse,
};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach keywarden at {server}: {source}")]
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

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
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

impl Client {
    pub fn new(server: &str, token: Option<String>) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("keywarden-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| ClientError::Connect {
                server: server.to_owned(),
                source,
            })?;
        Ok(Self {
            http,
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
            match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => Err(ClientError::Api { status, body }),
                Err(_) => Err(ClientError::Unexpected {
                    status,
                    detail: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                }),
            }
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
