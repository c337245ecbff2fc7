//! The API listener: publish endpoints, the publisher stream, operator
//! endpoints, Prometheus metrics and histogram dumps (HTTP/1.1 via hyper).
//!
//! Every error is JSON `{"error":{"code","message"}}` with the contract's
//! status. `/v1/*` and `/debug/*` need the API key when one is set (compared
//! in constant time); `/metrics` is open so scrapers need no secret.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::constant_time_eq;
use crate::batch;
use crate::broker::Shared;
use crate::listener::stream;
use crate::observe;
use crate::protocol::{self, UserId};
use crate::publish::{self, PublishError};
use crate::shard::Command;

type Body = Full<Bytes>;

/// Accepts API connections until `shutdown` fires.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, _) = match accepted {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "api accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                let shutdown = shutdown.clone();
                async move { Ok::<_, std::convert::Infallible>(route(req, shared, shutdown).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .max_buf_size(1 << 20)
                .serve_connection(TokioIo::new(stream), svc)
                .with_upgrades();
            let _ = conn.await;
        });
    }
}

/// A JSON response.
pub fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    json_text(status, v.to_string())
}

/// A JSON response from already-formatted JSON text.
fn json_text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An error response in the contract's shape.
pub fn error(status: u16, code: &str, message: &str) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json(status, &serde_json::json!({"error": {"code": code, "message": message}}));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

fn publish_error(e: &PublishError) -> Response<Body> {
    error(e.status(), e.code(), &e.to_string())
}

fn text(content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn route(req: Request<Incoming>, shared: Arc<Shared>, shutdown: CancellationToken) -> Response<Body> {
    let path = req.uri().path().to_string();
    let needs_key = path.starts_with("/v1/") || path.starts_with("/debug/");
    if needs_key && !authorized(&req, &shared) {
        shared.api_errors.count_status(401);
        return error(401, "unauthorized", "a valid Authorization: Bearer <api key> is required");
    }
    let resp = match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/publish") => publish_one(req, &shared).await,
        (&Method::POST, "/v1/publish/batch") => publish_batch(req, &shared).await,
        (&Method::POST, "/v1/broadcast") => broadcast(req, &shared).await,
        (&Method::GET, "/v1/stream") => stream::upgrade(req, shared.clone(), shutdown),
        (&Method::GET, "/v1/stats") => json(StatusCode::OK, &observe::stats(&shared).await),
        (&Method::GET, "/metrics") => {
            text("text/plain; version=0.0.4; charset=utf-8", observe::prometheus(&shared).await)
        }
        (&Method::GET, "/debug/histograms") => {
            let reset = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "reset=1"));
            text("text/plain; charset=utf-8", observe::hgrm_text(&shared, reset).await)
        }
        (m, p) if p.starts_with("/v1/users/") => {
            user_route(m.clone(), &p["/v1/users/".len()..], &shared).await
        }
        (
            _,
            "/v1/publish" | "/v1/publish/batch" | "/v1/broadcast" | "/v1/stream" | "/v1/stats" | "/metrics",
        ) => error(405, "method_not_allowed", "wrong method for this endpoint"),
        _ => error(404, "not_found", "no such endpoint"),
    };
    if !resp.status().is_success() && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        shared.api_errors.count_status(resp.status().as_u16());
    }
    resp
}

fn authorized(req: &Request<Incoming>, shared: &Shared) -> bool {
    let Some(key) = &shared.config.api_key else { return true };
    let Some(v) = req.headers().get(AUTHORIZATION).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    match v.split_once(' ') {
        Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => {
            constant_time_eq(token.trim().as_bytes(), key.as_bytes())
        }
        _ => false,
    }
}

/// Reads a body of at most `limit` bytes; `Err` is a ready 413/400 response.
async fn read_body(req: Request<Incoming>, limit: usize) -> Result<Bytes, Response<Body>> {
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            Err(error(413, "payload_too_large", &format!("body over {limit} bytes")))
        }
        Err(_) => Err(error(400, "bad_request", "could not read the request body")),
    }
}

async fn publish_one(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let body = match read_body(req, shared.config.max_payload).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let pending = match publish::submit_raw(shared, &body, true) {
        Ok(p) => p,
        Err(e) => return publish_error(&e),
    };
    match publish::resolve(pending).await {
        Ok(p) => json(StatusCode::OK, &p.to_json()),
        Err(e) => publish_error(&e),
    }
}

/// Body limit for a batch: every item at the payload limit, plus separators.
fn batch_limit(shared: &Shared) -> usize {
    batch::MAX_ITEMS.saturating_mul(shared.config.max_payload + 2).min(64 << 20)
}

async fn publish_batch(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let body = match read_body(req, batch_limit(shared)).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let items = match batch::split(&body) {
        Ok(items) => items,
        Err(e) => return error(400, e.code, &e.message),
    };
    let results = publish::publish_items(shared, &items, true).await;
    let mut out = String::with_capacity(16 + 32 * results.len());
    out.push_str("{\"results\":");
    publish::write_results(&mut out, &results);
    out.push('}');
    json_text(StatusCode::OK, out)
}

async fn broadcast(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let body = match read_body(req, shared.config.max_payload).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut buf = body.to_vec();
    let parsed = match protocol::parse_broadcast(&mut buf, &shared.redactor) {
        Ok(p) => p,
        Err(e) => return error(400, e.code, &e.message),
    };
    match publish::broadcast(shared, parsed.event).await {
        Ok(o) => json(StatusCode::OK, &serde_json::json!({"users": o.users, "delivered": o.delivered})),
        Err(e) => publish_error(&e),
    }
}

async fn user_route(method: Method, raw_id: &str, shared: &Shared) -> Response<Body> {
    let user = match UserId::parse(raw_id) {
        Ok(u) => u,
        Err(e) => return error(400, e.code, &e.message),
    };
    let shard = &shared.shards[shared.router.shard_for(&user)];
    match method {
        Method::GET => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if shard.push(Command::UserInfo { user, reply: tx }).is_err() {
                return error(503, "overloaded", "the shard is busy; retry shortly");
            }
            match rx.await {
                Ok(Some(info)) => json(StatusCode::OK, &serde_json::to_value(info).unwrap_or_default()),
                // A user the broker holds nothing for: no connections, nothing published.
                Ok(None) => json(
                    StatusCode::OK,
                    &serde_json::json!({"user": raw_id, "connections": 0, "seq": 0, "history": 0}),
                ),
                Err(_) => error(503, "unavailable", "the broker is shutting down"),
            }
        }
        Method::DELETE => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            if shard.push(Command::DropUser { user, reply: tx }).is_err() {
                return error(503, "overloaded", "the shard is busy; retry shortly");
            }
            match rx.await {
                Ok(n) => json(StatusCode::OK, &serde_json::json!({"closed": n})),
                Err(_) => error(503, "unavailable", "the broker is shutting down"),
            }
        }
        _ => error(405, "method_not_allowed", "use GET or DELETE"),
    }
}
