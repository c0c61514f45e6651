//! The HTTP listener: accepts connections up to a limit and closes slow and idle ones.
//!
//! `axum::serve` has no timeouts and no connection limit: slowloris sockets (a request
//! head sent a byte at a time) and idle sockets stayed open for good, and enough of them
//! ran the process out of file descriptors, after which nothing was accepted and verify
//! timed out. This accept loop serves each connection with hyper's HTTP/1 server (what
//! `axum::serve` ran with axum's default features) and watches it:
//!
//! - **header timeout**: a request head must arrive whole within `header_timeout` of its
//!   first byte, and a new connection must send its first head within `header_timeout`
//!   of being accepted;
//! - **idle timeout**: a kept-alive connection with no request for `idle_timeout` is
//!   closed, and so is one whose response has not moved to the client for that long
//!   (a client that stops reading);
//! - **connection limit**: at most `max_connections` at once; when all are taken the
//!   loop stops accepting (new connections wait in the kernel's backlog) until one
//!   closes, so the process never runs out of descriptors for its database and files.
//!
//! While a handler works on a request nothing times out: long polls and event streams
//! are the handler's business.
//!
//! hyper's own `header_read_timeout` is not used: its clock also runs while a kept-alive
//! connection waits for its next request, so it cannot tell a slow head from an idle
//! connection, and a gateway's pooled connections would be cut at the header timeout.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::{Bytes, Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tower::ServiceExt;

/// How connections are limited; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Descriptors kept free of connections: the database pool, the data files, webhook
/// requests, logs.
pub const RESERVED_DESCRIPTORS: u64 = 256;

/// Serves `app` on `listener` until `stop` turns true; then stops accepting, lets each
/// connection finish its request in flight, and returns when every connection has closed.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    // Each connection holds a receiver; `closed()` on the sender waits for them all.
    let (all_closed, open) = watch::channel(());
    let mut warned: Option<Instant> = None;
    loop {
        let permit = match permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                // Once a minute at most: under a flood the limit is reached over and over.
                if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection limit reached; not accepting until a connection closes"
                    );
                    warned = Some(Instant::now());
                }
                tokio::select! {
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    _ = stop.wait_for(|s| *s) => break,
                }
            }
        };
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: wait a little rather than spin.
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        tokio::spawn(connection(
            stream,
            peer,
            app.clone(),
            limits,
            permit,
            stop.clone(),
            open.clone(),
        ));
    }
    drop(listener);
    drop(open);
    all_closed.closed().await;
    Ok(())
}

fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    app: Router,
    limits: Limits,
    _permit: OwnedSemaphorePermit,
    mut stop: watch::Receiver<bool>,
    _open: watch::Receiver<()>,
) {
    let watch = Arc::new(Watch::new());
    let io = TokioIo::new(Watched {
        inner: stream,
        watch: watch.clone(),
    });
    let requests = watch.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let guard = requests.begin();
        req.extensions_mut().insert(ConnectInfo(peer));
        let app = app.clone();
        async move {
            let response = match app.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(response.map(|body| Guarded {
                inner: body,
                _guard: guard,
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut stopping = false;
    loop {
        let deadline = watch.deadline(&limits);
        let changed = watch.changed.notified();
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "connection ended with an error");
                }
                break;
            }
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
            () = changed => {}
            () = sleep_until(deadline) => {
                if let Some(why) = watch.expired(&limits, Instant::now()) {
                    tracing::debug!(%peer, why, "closing connection");
                    break;
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// What a connection is doing, as far as its timeouts care.
struct Watch {
    state: Mutex<State>,
    /// Woken when a deadline may have come closer: a request ended, a head began, a write
    /// blocked.
    changed: Notify,
}

struct State {
    /// Requests begun and not finished (their response body not yet sent or dropped).
    in_flight: usize,
    /// When the head being read began: accept time for a new connection, else the first
    /// byte after the last request.
    head_since: Option<Instant>,
    /// When the connection last fell idle (its last request finished).
    idle_since: Instant,
    /// Since when a write has waited for the client to read.
    write_blocked_since: Option<Instant>,
}

impl Watch {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            state: Mutex::new(State {
                in_flight: 0,
                head_since: Some(now),
                idle_since: now,
                write_blocked_since: None,
            }),
            changed: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere cannot leave the plain fields half-updated.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn begin(self: &Arc<Self>) -> RequestGuard {
        let mut s = self.lock();
        s.in_flight += 1;
        s.head_since = None;
        RequestGuard {
            watch: Arc::clone(self),
        }
    }

    fn end(&self) {
        let mut s = self.lock();
        s.in_flight = s.in_flight.saturating_sub(1);
        if s.in_flight == 0 {
            s.idle_since = Instant::now();
            drop(s);
            self.changed.notify_one();
        }
    }

    fn read(&self) {
        let mut s = self.lock();
        if s.in_flight == 0 && s.head_since.is_none() {
            s.head_since = Some(Instant::now());
            drop(s);
            self.changed.notify_one();
        }
    }

    fn wrote(&self, blocked: bool) {
        let mut s = self.lock();
        match (blocked, s.write_blocked_since) {
            (true, None) => {
                s.write_blocked_since = Some(Instant::now());
                drop(s);
                self.changed.notify_one();
            }
            (false, Some(_)) => s.write_blocked_since = None,
            _ => {}
        }
    }

    /// When the connection is to be closed unless something happens first.
    fn deadline(&self, limits: &Limits) -> Option<Instant> {
        let s = self.lock();
        let blocked = s.write_blocked_since.map(|t| t + limits.idle_timeout);
        let quiet = if s.in_flight > 0 {
            None
        } else if let Some(t) = s.head_since {
            Some(t + limits.header_timeout)
        } else {
            Some(s.idle_since + limits.idle_timeout)
        };
        match (blocked, quiet) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Why the connection is to be closed now, if it is.
    fn expired(&self, limits: &Limits, now: Instant) -> Option<&'static str> {
        let s = self.lock();
        if s.write_blocked_since
            .is_some_and(|t| now >= t + limits.idle_timeout)
        {
            return Some("the client has not read its response within the idle timeout");
        }
        if s.in_flight > 0 {
            return None;
        }
        match s.head_since {
            Some(t) if now >= t + limits.header_timeout => {
                Some("no whole request head within the header timeout")
            }
            Some(_) => None,
            None if now >= s.idle_since + limits.idle_timeout => Some("idle for the idle timeout"),
            None => None,
        }
    }
}

/// Marks a request as finished when dropped, with its response body.
struct RequestGuard {
    watch: Arc<Watch>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.watch.end();
    }
}

/// A response body that holds its request's guard until it is sent or dropped.
struct Guarded {
    inner: axum::body::Body,
    _guard: RequestGuard,
}

impl hyper::body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, telling its `Watch` about reads and blocked writes.
struct Watched {
    inner: TcpStream,
    watch: Arc<Watch>,
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(poll, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.watch.read();
        }
        poll
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write(cx, data);
        this.watch.wrote(poll.is_pending());
        poll
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch.wrote(poll.is_pending());
        poll
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

/// Raises the soft limit on open files to the hard limit, and returns the soft limit in
/// force (`None` when unlimited or unknown). Servers start with a soft limit of 1,024 on
/// most systems, far below the connections a gateway may hold open.
pub fn raise_fd_limit() -> Option<u64> {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
        let limit = getrlimit(Resource::Nofile);
        if let (Some(current), Some(maximum)) = (limit.current, limit.maximum) {
            if current < maximum {
                let raised = Rlimit {
                    current: Some(maximum),
                    maximum: Some(maximum),
                };
                match setrlimit(Resource::Nofile, raised) {
                    Ok(()) => {
                        tracing::debug!(from = current, to = maximum, "raised the open-file limit");
                        return Some(maximum);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, limit = current, "cannot raise the open-file limit");
                    }
                }
            }
        }
        getrlimit(Resource::Nofile).current
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// `max_connections`, lowered if the open-file limit could not hold that many plus the
/// descriptors the rest of the server needs.
pub fn effective_max_connections(max_connections: usize, fd_limit: Option<u64>) -> usize {
    let Some(limit) = fd_limit else {
        return max_connections.max(1);
    };
    let room = usize::try_from(limit.saturating_sub(RESERVED_DESCRIPTORS)).unwrap_or(usize::MAX);
    max_connections.min(room).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_limit_leaves_room_for_the_server() {
        assert_eq!(effective_max_connections(10_000, None), 10_000);
        assert_eq!(effective_max_connections(10_000, Some(1_048_576)), 10_000);
        assert_eq!(effective_max_connections(10_000, Some(1_024)), 768);
        assert_eq!(effective_max_connections(10_000, Some(10)), 1);
    }

    #[test]
    fn deadlines_follow_what_the_connection_does() {
        let limits = Limits {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1,
        };
        let later = |secs| Instant::now() + Duration::from_secs(secs);
        let w = Arc::new(Watch::new());
        let accepted = w.deadline(&limits);
        assert!(accepted.is_some_and(|d| d <= later(10)));
        w.read();
        assert_eq!(
            w.deadline(&limits),
            accepted,
            "a new connection's first head is timed from the accept"
        );
        assert!(w.expired(&limits, later(11)).is_some());
        let guard = w.begin();
        assert_eq!(
            w.deadline(&limits),
            None,
            "a request in flight does not time out"
        );
        assert_eq!(w.expired(&limits, later(1000)), None);
        drop(guard);
        let idle = w.deadline(&limits);
        assert!(idle.is_some_and(|d| d > later(50) && d <= later(60)));
        assert_eq!(w.expired(&limits, later(30)), None);
        assert!(w.expired(&limits, later(61)).is_some());
        w.read();
        let head = w.deadline(&limits);
        assert!(
            head.is_some_and(|d| d > later(5) && d <= later(10)),
            "the next head is timed from its first byte"
        );
        let _guard = w.begin();
        w.wrote(true);
        assert!(w.deadline(&limits).is_some_and(|d| d <= later(60)));
        assert!(
            w.expired(&limits, later(61)).is_some(),
            "a client that stops reading"
        );
        w.wrote(false);
        assert_eq!(w.deadline(&limits), None);
    }
}
