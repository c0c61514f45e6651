//! A real webhook receiver on a free loopback port: records every request and answers
//! with the status the test sets.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::Value;

#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: Vec<u8>,
    pub json: Value,
}

#[derive(Clone, Default)]
struct Shared {
    got: Arc<Mutex<Vec<Received>>>,
    status: Arc<AtomicU16>,
    notify: Arc<tokio::sync::Notify>,
}

pub struct Receiver {
    pub url: String,
    shared: Shared,
}

async fn hook(State(s): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let h = |n: &str| {
        headers
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let r = Received {
        id: h("webhook-id"),
        timestamp: h("webhook-timestamp"),
        signature: h("webhook-signature"),
        json: serde_json::from_slice(&body).unwrap_or(Value::Null),
        body: body.to_vec(),
    };
    s.got.lock().unwrap().push(r);
    s.notify.notify_waiters();
    StatusCode::from_u16(s.status.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK)
}

impl Receiver {
    pub async fn start() -> Self {
        let shared = Shared::default();
        shared.status.store(200, Ordering::SeqCst);
        let app = axum::Router::new()
            .route("/hook", axum::routing::post(hook))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url: format!("http://{addr}/hook"),
            shared,
        }
    }

    pub fn answer(&self, status: u16) {
        self.shared.status.store(status, Ordering::SeqCst);
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.got.lock().unwrap().clone()
    }

    /// Waits until `n` requests arrived (or panics after `secs`), woken by each arrival.
    pub async fn wait_for(&self, n: usize, secs: u64) -> Vec<Received> {
        let arrived = async {
            loop {
                // Taken before the count is read: an arrival in between still wakes it.
                let notified = self.shared.notify.notified();
                let got = self.received();
                if got.len() >= n {
                    return got;
                }
                notified.await;
            }
        };
        match tokio::time::timeout(Duration::from_secs(secs), arrived).await {
            Ok(got) => got,
            Err(_) => panic!(
                "{} webhook(s) arrived within {secs}s, expected {n}",
                self.received().len()
            ),
        }
    }
}
