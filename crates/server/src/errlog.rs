//! One error-level line for every 5xx answer, whoever made it (a handler's error, a
//! panic, the body limit): its request id, method and route template, status, and the
//! cause the error left in the response's extensions ([`ErrorCause`]). The route is the
//! template (`/v1/keys/{id}/revoke`), never the path: paths carry ids and, misplaced,
//! secrets. The request id is the one the answer carries, with any key in it redacted.
//!
//! Handlers do not log their own failures: this layer writes the one line, so a failure
//! is never logged twice or without the request it failed.
//!
//! It also counts every answer a store error made, by kind ([`StoreFailure`]), whatever
//! its status: a conflict answers 409, and is still the store's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::response::Response;

use crate::error::{ErrorCause, StoreFailure};
use crate::metrics::Metrics;

/// Layer over every route and fallback; see the module documentation.
#[derive(Clone)]
pub struct ServerErrorLogLayer {
    metrics: Arc<Metrics>,
}

impl ServerErrorLogLayer {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl<S> tower::Layer<S> for ServerErrorLogLayer {
    type Service = ServerErrorLog<S>;

    fn layer(&self, inner: S) -> ServerErrorLog<S> {
        ServerErrorLog {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct ServerErrorLog<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

// Generic over the body: inner layers (the panic catcher) answer with their own.
impl<S, B> tower::Service<Request> for ServerErrorLog<S>
where
    S: tower::Service<Request, Response = Response<B>, Error = Infallible>,
    S::Future: Unpin,
{
    type Response = Response<B>;
    type Error = Infallible;
    type Future = Logged<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        // The request is gone when the answer comes, so what the line needs of it is kept
        // now: the method (a copy for the standard ones) and the route (a reference
        // count). Nothing is formatted unless the answer is a 5xx.
        let route = req.extensions().get::<MatchedPath>().cloned();
        Logged {
            method: req.method().clone(),
            route,
            inner: self.inner.call(req),
            metrics: self.metrics.clone(),
        }
    }
}

/// The inner service's answer, logged on its way out if it is a 5xx.
pub struct Logged<F> {
    method: Method,
    route: Option<MatchedPath>,
    inner: F,
    metrics: Arc<Metrics>,
}

impl<F, B> Future for Logged<F>
where
    F: Future<Output = Result<Response<B>, Infallible>> + Unpin,
{
    type Output = Result<Response<B>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let answer = std::task::ready!(Pin::new(&mut this.inner).poll(cx));
        if let Ok(resp) = &answer {
            if let Some(StoreFailure(kind)) = resp.extensions().get::<StoreFailure>() {
                this.metrics.store_error(*kind);
            }
            if resp.status().is_server_error() {
                log(&this.method, this.route.as_ref(), resp);
            }
        }
        Poll::Ready(answer)
    }
}

#[cold]
fn log<B>(method: &Method, route: Option<&MatchedPath>, resp: &Response<B>) {
    let request_id = crate::auth::header_text(resp.headers(), "x-request-id", 128);
    let cause = resp.extensions().get::<ErrorCause>();
    tracing::error!(
        request_id = request_id.as_deref().unwrap_or("-"),
        method = %method,
        route = route.map_or("<no route>", MatchedPath::as_str),
        status = resp.status().as_u16(),
        code = cause.map_or("-", |c| c.code.as_str()),
        cause = cause.and_then(|c| c.detail.as_deref()).unwrap_or("-"),
        "request failed"
    );
}
