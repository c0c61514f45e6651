//! keywarden-server: the only crate that serves HTTP.
//!
//! Routes (axum, documented by utoipa), admin-token auth and roles, the verify hot path
//! with its cache, the batched usage writer, and server start-up and shutdown.

pub mod alerts;
pub mod auth;
pub mod behaviour;
pub mod bootstrap;
pub mod cache;
pub mod cluster;
pub mod config;
pub mod dispatch;
pub mod enforcer;
pub mod errlog;
pub mod error;
pub mod extract;
pub mod guard;
pub mod limits;
pub mod listen;
pub mod mail;
pub mod messages;
pub mod metrics;
pub mod outbound;
pub mod routes;
pub mod state;
pub mod usage;
pub mod views;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::Request;
use axum::routing::get;
use axum::{Json, Router};
use keywarden_core::clock::Clock;
use keywarden_core::PlainKey;
use keywarden_proto::ErrorCode;
use keywarden_store::Store;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::{DefaultOnResponse, TraceLayer};
use tracing::Level;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use config::Config;
use error::error_response;
use state::{AppState, SharedState};

pub const BODY_LIMIT: usize = 64 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(title = "keywarden", description = "Governs provisioning keys: issue, verify, govern, audit."),
    modifiers(&BearerAuth),
    paths(routes::gateway::auth_doc),
    tags((name = "keys"), (name = "verify"), (name = "tokens"), (name = "audit"), (name = "policy"), (name = "owners"), (name = "services"), (name = "alerts"), (name = "usage"), (name = "health"), (name = "metrics"))
)]
struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        if let Some(components) = openapi.components.as_mut() {
            components.add_security_scheme(
                "bearer",
                SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
            );
        }
    }
}

/// The routes and their OpenAPI document, built from the same definitions.
pub fn api(state: SharedState) -> (Router, utoipa::openapi::OpenApi) {
    let (router, doc) = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(routes::health::healthz))
        .routes(routes!(routes::metrics::metrics))
        .routes(routes!(routes::keys::create_key, routes::keys::list_keys))
        .routes(routes!(routes::keys::get_key))
        .routes(routes!(routes::keys::suspend_key))
        .routes(routes!(routes::keys::resume_key))
        .routes(routes!(routes::keys::revoke_key))
        .routes(routes!(routes::keys::rotate_key))
        .routes(routes!(routes::keys::key_usage))
        .routes(routes!(routes::usage::key_usage_stats))
        .routes(routes!(routes::usage::usage_stats))
        .routes(routes!(routes::usage::usage_search))
        .routes(routes!(routes::verify::verify))
        .routes(routes!(
            routes::tokens::create_token,
            routes::tokens::list_tokens
        ))
        .routes(routes!(routes::tokens::revoke_token))
        .routes(routes!(routes::audit::list_audit))
        .routes(routes!(routes::audit::export_audit))
        .routes(routes!(routes::audit::audit_chain))
        .routes(routes!(routes::audit::create_checkpoint))
        .routes(routes!(routes::audit::archive_audit))
        .routes(routes!(routes::audit::quarantine_audit))
        .routes(routes!(routes::usage_chain::usage_chain))
        .routes(routes!(routes::usage_chain::export_usage_chain))
        .routes(routes!(
            routes::policy::get_policy,
            routes::policy::put_policy
        ))
        .routes(routes!(
            routes::owners::put_owner,
            routes::owners::list_owners
        ))
        .routes(routes!(routes::owners::get_owner))
        .routes(routes!(routes::owners::disable_owner))
        .routes(routes!(routes::owners::enable_owner))
        .routes(routes!(routes::policy::enforce_plan))
        .routes(routes!(routes::policy::plan_policy))
        .routes(routes!(routes::policy::enforce_now))
        .routes(routes!(
            routes::services::create_service,
            routes::services::list_services
        ))
        .routes(routes!(
            routes::services::get_service,
            routes::services::delete_service
        ))
        .routes(routes!(routes::services::test_service))
        .routes(routes!(routes::services::ack_service))
        .routes(routes!(routes::events::events))
        .routes(routes!(routes::alerts::list_alerts))
        .routes(routes!(routes::alerts::show_alert))
        .routes(routes!(routes::alerts::ack_alert))
        .routes(routes!(routes::alerts::resolve_alert))
        .routes(routes!(routes::discovery::identify))
        .routes(routes!(
            routes::discovery::import_shadow_keys,
            routes::discovery::list_shadow_keys
        ))
        .with_state(state.clone())
        .split_for_parts();
    // SCIM speaks its own schema (RFC 7644) and stays out of the OpenAPI document.
    let scim = Router::new()
        .route(
            "/scim/v2/Users",
            axum::routing::post(routes::scim::create_user).get(routes::scim::list_users),
        )
        .route(
            "/scim/v2/Users/{id}",
            get(routes::scim::get_user)
                .put(routes::scim::replace_user)
                .patch(routes::scim::patch_user)
                .delete(routes::scim::delete_user),
        )
        .with_state(state.clone());
    // Forward auth answers whatever method the gateway forwards with (documented as GET).
    let gateway = Router::new()
        .route("/v1/auth", axum::routing::any(routes::gateway::auth))
        .route(
            "/v1/auth/{*rest}",
            axum::routing::any(routes::gateway::auth),
        )
        .with_state(state);
    let router = router.merge(scim).merge(gateway);
    (router, doc)
}

/// Request ids: a random per-router prefix and a counter. Unique and cheap: a syscall for
/// randomness on every request showed up in the verify profile, and so did a shared
/// counter, written by every worker on every request. Each thread takes ids from a block
/// of its own; the ids stay unique, though not in request order across threads.
#[derive(Clone, Copy)]
struct RequestIds {
    /// Leaked once per router: the services cloned for each request copy a reference.
    boot: &'static str,
}

impl RequestIds {
    fn new() -> Self {
        Self {
            boot: String::leak(keywarden_core::base62::random(&mut rand::rngs::OsRng, 8)),
        }
    }
}

const REQUEST_ID_BLOCK: u64 = 1 << 16;
static REQUEST_ID_BLOCKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// The next id of this thread's block and the end of the block.
    static REQUEST_ID_NEXT: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

fn next_request_number() -> u64 {
    REQUEST_ID_NEXT.with(|cell| {
        let (mut next, mut end) = cell.get();
        if next == end {
            next =
                REQUEST_ID_BLOCKS.fetch_add(REQUEST_ID_BLOCK, std::sync::atomic::Ordering::Relaxed);
            end = next + REQUEST_ID_BLOCK;
        }
        cell.set((next + 1, end));
        next
    })
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _: &Request<B>) -> Option<RequestId> {
        // Built in a stack buffer: `format!` took a quarter of a µs per request in the
        // verify profile.
        let mut number = itoa::Buffer::new();
        let number = number.format(next_request_number()).as_bytes();
        let mut buf = [0u8; 64];
        let boot = self.boot.as_bytes();
        let len = boot.len() + 1 + number.len();
        let id = buf.get_mut(..len)?;
        id[..boot.len()].copy_from_slice(boot);
        id[boot.len()] = b'-';
        id[boot.len() + 1..].copy_from_slice(number);
        axum::http::HeaderValue::from_bytes(id)
            .ok()
            .map(RequestId::new)
    }
}

pub fn router(state: SharedState) -> Router {
    let metrics = state.metrics.clone();
    let (router, doc) = api(state);
    let doc = Arc::new(doc);
    let router = router
        .route(
            "/v1/openapi.json",
            get(move || async move { Json((*doc).clone()) }),
        )
        .fallback(|| async {
            error_response(ErrorCode::RouteNotFound, "no such route".to_owned(), vec![])
        })
        .method_not_allowed_fallback(|| async {
            error_response(
                ErrorCode::MethodNotAllowed,
                "method not allowed on this route".to_owned(),
                vec![],
            )
        })
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(guard::JsonErrorsLayer);
    // Per-request lines at DEBUG: the verify path should not pay for a log line. Headers
    // are never recorded (they carry bearer tokens). Without DEBUG for this target when
    // the router is built, the layer is left out: it would time every request for a line
    // nobody sees.
    let router = if tracing::enabled!(target: "tower_http::trace", Level::DEBUG) {
        router.layer(
            TraceLayer::new_for_http()
                .make_span_with(guard::RedactedSpan)
                .on_response(DefaultOnResponse::new().level(Level::DEBUG)),
        )
    } else {
        router
    };
    // Outermost first. A panic's answer is made inside the request id layers, so it
    // carries the id, and the 5xx log outside them all reads the id from the answer. One
    // `Router::layer` for the four: each call boxes the service again, which costs every
    // request an allocation for the clone and one for the future.
    router.layer(
        tower::ServiceBuilder::new()
            .layer(errlog::ServerErrorLogLayer::new(metrics))
            .layer(SetRequestIdLayer::x_request_id(RequestIds::new()))
            .layer(PropagateRequestIdLayer::x_request_id())
            .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                |_: Box<dyn std::any::Any + Send>| {
                    error_response(ErrorCode::Internal, "internal error".to_owned(), vec![])
                },
            )),
    )
}

/// The router of `--metrics-listen`: `GET /metrics` without a token, and nothing else.
pub fn metrics_router(state: SharedState) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .route("/metrics", get(routes::metrics::open_metrics))
        .with_state(state)
        .fallback(|| async {
            error_response(
                ErrorCode::RouteNotFound,
                "this listener serves only GET /metrics".to_owned(),
                vec![],
            )
        })
        .method_not_allowed_fallback(|| async {
            error_response(
                ErrorCode::MethodNotAllowed,
                "method not allowed on this route".to_owned(),
                vec![],
            )
        })
        .layer(guard::JsonErrorsLayer)
        .layer(
            tower::ServiceBuilder::new()
                .layer(errlog::ServerErrorLogLayer::new(metrics))
                .layer(SetRequestIdLayer::x_request_id(RequestIds::new()))
                .layer(PropagateRequestIdLayer::x_request_id())
                .layer(tower_http::catch_panic::CatchPanicLayer::custom(
                    |_: Box<dyn std::any::Any + Send>| {
                        error_response(ErrorCode::Internal, "internal error".to_owned(), vec![])
                    },
                )),
        )
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Bootstrap(#[from] bootstrap::BootstrapError),
    #[error("store: {0}")]
    Store(#[from] keywarden_store::StoreError),
    #[error("policy: {0}")]
    Policy(String),
    #[error("outbound HTTP client: {0}")]
    Outbound(#[from] outbound::OutboundError),
    #[error("{0}")]
    Smtp(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A started server. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    pub addr: SocketAddr,
    /// Where `--metrics-listen` serves `/metrics`, when it is set.
    pub metrics_addr: Option<SocketAddr>,
    /// The bootstrap admin token, when this start created one.
    pub bootstrap_token: Option<PlainKey>,
    pub state: SharedState,
    stop_http: watch::Sender<bool>,
    stop_usage: watch::Sender<bool>,
    stop_jobs: watch::Sender<bool>,
    http: JoinHandle<std::io::Result<()>>,
    metrics_http: Option<JoinHandle<std::io::Result<()>>>,
    usage: JoinHandle<()>,
    upkeep: JoinHandle<()>,
    expiry: JoinHandle<()>,
    dispatcher: JoinHandle<()>,
    alerts: JoinHandle<()>,
    sync: JoinHandle<()>,
    /// Released when the server has stopped (SQLite only).
    data_locks: Vec<bootstrap::DataDirLock>,
}

pub async fn start(config: Config, clock: Arc<dyn Clock>) -> Result<RunningServer, StartError> {
    bootstrap::ensure_data_dir(&config.data_dir)?;
    // Several nodes share a PostgreSQL database by design; a SQLite database belongs to
    // one server.
    let sqlite_file = keywarden_store::sqlite_file(&config.database_url());
    let mut data_locks = Vec::new();
    if let Some(db) = &sqlite_file {
        data_locks.push(bootstrap::lock_data_dir(&config.data_dir)?);
        let outside = db
            .parent()
            .and_then(|p| p.canonicalize().ok())
            .zip(config.data_dir.canonicalize().ok())
            .is_none_or(|(a, b)| a != b);
        if outside {
            data_locks.push(bootstrap::lock_database(db)?);
        }
        bootstrap::protect_database_file(db)?;
    }
    keywarden_core::key_format::validate_prefix(&config.key_prefix)
        .map_err(bootstrap::BootstrapError::from)?;
    let hasher = bootstrap::load_hasher(&config.data_dir, config.pepper.as_deref())?;
    let signer = bootstrap::load_signer(&config.data_dir, config.audit_signing_key.as_deref())?;
    let store = Store::connect(&config.database_url()).await?;
    let now = keywarden_core::clock::truncate_to_millis(clock.now());
    let bootstrap_token =
        bootstrap::bootstrap_admin(&store, &hasher, &config.key_prefix, &config.data_dir, now)
            .await?;

    let metrics = Arc::new(metrics::Metrics::new());
    let (usage_tx, usage_rx) = usage::channel(config.usage_queue_capacity);
    let (uses_tx, uses_rx) = alerts::uses_channel();
    let (stop_usage, stop_usage_rx) = watch::channel(false);
    let usage = tokio::spawn(usage::run_writer(
        store.clone(),
        usage_rx,
        usage::Schedule {
            flush: config.usage_flush_interval,
            fold: config.usage_fold_interval,
            fold_max_keys: config.usage_fold_max_keys,
        },
        metrics.usage.clone(),
        Some(uses_tx),
        stop_usage_rx,
    ));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: config.listen,
        source,
    })?;
    // Bound before anything else starts, so a taken address fails the start.
    let metrics_listener = match config.metrics_listen {
        None => None,
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at)
                .await
                .map_err(|source| StartError::Listen { addr: at, source })?;
            let bound = l
                .local_addr()
                .map_err(|source| StartError::Listen { addr: at, source })?;
            Some((l, bound))
        }
    };
    bootstrap::record_listen(&config.data_dir, addr)?;
    for lock in &data_locks {
        lock.record(Some(addr))
            .map_err(|source| bootstrap::BootstrapError::LockFile {
                path: lock.path().display().to_string(),
                source,
            })?;
    }
    let outbound = outbound::Outbound::new(
        config.outbound_allow.clone(),
        config.webhook_timeout,
        config.outbound_proxy.as_deref(),
    )?;
    let (alerts_tx, alerts_rx) = alerts::channel();
    let mailer = config
        .smtp_url
        .as_deref()
        .map(|url| mail::Mailer::new(url, &config.smtp_from, config.smtp_security_to.as_deref()))
        .transpose()
        .map_err(StartError::Smtp)?;
    let links = state::Links {
        usage: usage_tx,
        alerts: alerts_tx,
        outbound,
        metrics,
        mailer,
    };
    let state: SharedState = Arc::new(AppState::new(store, hasher, clock, config, signer, links));
    // Verify reads the cached policy; load the stored one before the first request.
    if let Err(e) = state.policy().await {
        return Err(match e {
            error::ApiError::Store(e) => StartError::Store(e),
            other => StartError::Policy(other.to_string()),
        });
    }
    let (stop_jobs, stop_jobs_rx) = watch::channel(false);
    let expiry = tokio::spawn(enforcer::run(
        state.clone(),
        state.config.enforcer_interval,
        stop_jobs_rx.clone(),
    ));
    let dispatcher = tokio::spawn(dispatch::run(state.clone(), stop_jobs_rx.clone()));
    let upkeep = tokio::spawn({
        let recorded = state.metrics.clone();
        let mut stop = stop_jobs_rx.clone();
        async move {
            let mut tick = tokio::time::interval(metrics::UPKEEP_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => recorded.upkeep(),
                    _ = stop.changed() => return,
                }
            }
        }
    });
    let alerts = tokio::spawn(alerts::run(
        state.clone(),
        alerts_rx,
        uses_rx,
        stop_jobs_rx.clone(),
    ));
    let sync = tokio::spawn({
        let state = state.clone();
        async move {
            tokio::join!(
                cluster::sync(state.clone(), stop_jobs_rx.clone()),
                cluster::renew_ahead(state, stop_jobs_rx),
            );
        }
    });
    let app = router(state.clone());
    let (stop_http, stop_http_rx) = watch::channel(false);
    let fd_limit = listen::raise_fd_limit();
    let limits = listen::Limits {
        header_timeout: state.config.header_timeout,
        idle_timeout: state.config.idle_timeout,
        max_connections: listen::effective_max_connections(state.config.max_connections, fd_limit),
    };
    if limits.max_connections < state.config.max_connections {
        tracing::warn!(
            configured = state.config.max_connections,
            max_connections = limits.max_connections,
            open_file_limit = fd_limit,
            "the open-file limit cannot hold max_connections; lowered"
        );
    }
    let http = tokio::spawn(listen::serve(listener, app, limits, stop_http_rx.clone()));
    tracing::info!(%addr, "keywarden listening");
    let metrics_addr = metrics_listener.as_ref().map(|(_, bound)| *bound);
    let metrics_http = metrics_listener.map(|(l, bound)| {
        tracing::info!(addr = %bound, "metrics listening (GET /metrics, no token)");
        tokio::spawn(listen::serve(
            l,
            metrics_router(state.clone()),
            limits,
            stop_http_rx,
        ))
    });
    Ok(RunningServer {
        addr,
        metrics_addr,
        bootstrap_token,
        state,
        stop_http,
        stop_usage,
        stop_jobs,
        http,
        metrics_http,
        usage,
        upkeep,
        expiry,
        dispatcher,
        alerts,
        sync,
        data_locks,
    })
}

impl RunningServer {
    /// Stops every task at their next await, without waiting for anything: for an owner
    /// that cannot wait (a drop, perhaps while a panic unwinds). Queued usage events and
    /// alerts are lost and requests in flight are cut; [`RunningServer::shutdown`] is the
    /// orderly stop.
    pub fn abort(&self) {
        self.state.begin_closing();
        let _ = self.stop_http.send(true);
        let _ = self.stop_jobs.send(true);
        let _ = self.stop_usage.send(true);
        self.http.abort();
        if let Some(m) = &self.metrics_http {
            m.abort();
        }
        for task in [
            &self.usage,
            &self.upkeep,
            &self.expiry,
            &self.dispatcher,
            &self.alerts,
            &self.sync,
        ] {
            task.abort();
        }
    }

    /// Stops accepting, finishes in-flight requests, then writes every queued usage event
    /// and alert.
    pub async fn shutdown(self) {
        self.state.begin_closing();
        let _ = self.stop_http.send(true);
        match self.http.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "http server failed"),
            Err(e) => tracing::error!(error = %e, "http server task failed"),
        }
        if let Some(m) = self.metrics_http {
            match m.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "metrics listener failed"),
                Err(e) => tracing::error!(error = %e, "metrics listener task failed"),
            }
        }
        let _ = self.stop_jobs.send(true);
        for (name, task) in [
            ("metrics upkeep", self.upkeep),
            ("enforcer", self.expiry),
            ("dispatcher", self.dispatcher),
            ("alerts", self.alerts),
            ("sync", self.sync),
        ] {
            if let Err(e) = task.await {
                tracing::error!(error = %e, task = name, "background task failed");
            }
        }
        let _ = self.stop_usage.send(true);
        if let Err(e) = self.usage.await {
            tracing::error!(error = %e, "usage writer task failed");
        }
        self.state.store.close().await;
        drop(self.data_locks);
        tracing::info!("keywarden stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ids come from per-thread blocks: unique across threads, and across the blocks a
    /// thread goes through.
    #[test]
    fn request_numbers_are_unique_across_threads() {
        let per_thread = usize::try_from(REQUEST_ID_BLOCK).unwrap() + 10;
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(move || {
                    (0..per_thread)
                        .map(|_| next_request_number())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = std::collections::HashSet::new();
        for t in threads {
            for n in t.join().unwrap() {
                assert!(all.insert(n), "{n} handed out twice");
            }
        }
        assert_eq!(all.len(), 4 * per_thread);
    }

    #[test]
    fn request_ids_are_the_boot_prefix_and_a_number() {
        let mut ids = RequestIds { boot: "Ab3dE6gH" };
        let request = Request::new(());
        let a = ids.make_request_id(&request).unwrap();
        let b = ids.make_request_id(&request).unwrap();
        let text = |id: &RequestId| id.header_value().to_str().unwrap().to_owned();
        for id in [&a, &b] {
            let (boot, n) = text(id)
                .split_once('-')
                .map(|(x, y)| (x.to_owned(), y.to_owned()))
                .unwrap();
            assert_eq!(boot, "Ab3dE6gH");
            n.parse::<u64>().unwrap();
        }
        assert_ne!(text(&a), text(&b));
    }
}
