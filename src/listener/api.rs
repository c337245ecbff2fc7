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
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, ORIGIN};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::auth::constant_time_eq;
use crate::batch;
use crate::listener::reply::{self, error, json, json_text, Refusal};
use crate::listener::stream;
use crate::listener::watchdog::{Activity, Tracked};
use crate::listener::watchdog::{OpenConnections, Slot};
use crate::observe;
use crate::protocol::{self, UserId};
use crate::publish::{self, PublishError};
use crate::shard::Command;
use crate::shared::Shared;

type Body = Full<Bytes>;

/// Accepts API connections until `shutdown` fires. Each gets a slot (or an
/// immediate 503), then a TLS handshake with `tls`, then HTTP/1.1 under
/// the [`crate::listener::watchdog`]'s deadlines.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    open: OpenConnections,
    shutdown: CancellationToken,
) {
    let mut next_seat = Seats::default();
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
        let Some(slot) = open.try_open() else {
            shared.api_errors.count_status(503);
            tokio::spawn(refuse_over_limit(stream, tls.is_some()));
            continue;
        };
        let seat = next_seat.next(&shared).cloned();
        let (shared, shutdown, tls) = (shared.clone(), shutdown.clone(), tls.clone());
        let serve = |stream: TcpStream| async move {
            let head_deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
            match tls {
                None => serve_connection(stream, shared, slot, shutdown).await,
                Some(acceptor) => {
                    if let Ok(Ok(s)) = tokio::time::timeout_at(head_deadline, acceptor.accept(stream)).await {
                        serve_connection(s, shared, slot, shutdown).await;
                    }
                }
            }
        };
        let Some(rt) = seat else {
            tokio::spawn(serve(stream)); // no shard runtime (one failed to start): serve here
            continue;
        };
        match stream.into_std() {
            Ok(std) => {
                rt.spawn(async move {
                    // Registered with the shard's own reactor from here on.
                    match TcpStream::from_std(std) {
                        Ok(stream) => serve(stream).await,
                        Err(e) => tracing::warn!(error = %e, "could not move an API connection to its shard"),
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "could not detach an API connection"),
        }
    }
}

/// Round-robin over the shards' runtimes. API connections are served on
/// the shard threads: a publisher's items for that shard's users are
/// applied on the thread that owns them (no cross-thread wake, and with
/// `--shards 1` no event crosses a thread), and items for other shards go
/// to their rings as from anywhere else.
#[derive(Default)]
struct Seats(usize);

impl Seats {
    fn next<'a>(&mut self, shared: &'a Shared) -> Option<&'a tokio::runtime::Handle> {
        let n = shared.shards.len();
        let h = shared.shards.get(self.0 % n.max(1))?;
        self.0 = self.0.wrapping_add(1);
        h.runtime()
    }
}

/// Answers a connection over `--api-max-connections`: 503 on plain HTTP,
/// an immediate close under TLS (there is no session to answer in).
async fn refuse_over_limit(mut stream: TcpStream, tls: bool) {
    if tls {
        return;
    }
    let r = Refusal::new(503, "too_many_connections", "the API listener is at --api-max-connections");
    let _ = tokio::time::timeout(Duration::from_secs(1), reply::respond(&mut stream, &r)).await;
}

/// Serves HTTP/1.1 on one connection until it closes, overstays the
/// watchdog's deadlines, or (at shutdown) has answered its request in flight.
async fn serve_connection<I>(io: I, shared: Arc<Shared>, slot: Slot, shutdown: CancellationToken)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Activity::new();
    let io = Tracked::new(io, activity.clone());
    let svc = {
        let (shared, shutdown, activity) = (shared.clone(), shutdown.clone(), activity.clone());
        hyper::service::service_fn(move |req| {
            let (shared, shutdown, slot) = (shared.clone(), shutdown.clone(), slot.clone());
            let busy = activity.begin_request();
            async move {
                let resp = route(req, shared, slot, shutdown).await;
                drop(busy);
                Ok::<_, std::convert::Infallible>(resp)
            }
        })
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .max_buf_size(1 << 20)
        .serve_connection(TokioIo::new(io), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let cfg = &shared.config;
    let tick = (cfg.handshake_timeout.min(cfg.idle_timeout) / 4)
        .clamp(Duration::from_millis(5), Duration::from_millis(500));
    let mut draining = false;
    // Registered once, not per request: the token's waiter list is behind a mutex.
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + tick, tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = &mut conn => return,
            _ = &mut cancelled, if !draining => {
                conn.as_mut().graceful_shutdown();
                draining = true;
            }
            _ = ticker.tick() => {
                if activity.expired(tokio::time::Instant::now(), cfg.handshake_timeout, cfg.idle_timeout) {
                    return;
                }
            }
        }
    }
}

fn publish_error(e: &PublishError) -> Response<Body> {
    error(e.status(), e.code(), &e.to_string())
}

/// The operator page: served without the key (it asks for it and sends it
/// as a Bearer header on its own same-origin requests); scripts and styles
/// are inline, and the policy allows nothing else.
fn dashboard() -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(observe::DASHBOARD_HTML.as_bytes())));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(hyper::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(hyper::header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        hyper::header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'",
        ),
    );
    r
}

fn text(content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

async fn route(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    slot: Slot,
    shutdown: CancellationToken,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if shared.config.api_key.is_none() && req.headers().contains_key(ORIGIN) {
        // Without a key, a browser page on this machine could reach the
        // loopback API: anything sent from a page is refused.
        shared.api_errors.count_status(403);
        return error(
            403,
            "forbidden_origin",
            "requests from web pages (with an Origin header) need --api-key to be set",
        );
    }
    let needs_key = path.starts_with("/v1/") || path.starts_with("/debug/");
    if needs_key && !authorized(&req, &shared) {
        shared.api_errors.count_status(401);
        return error(401, "unauthorized", "a valid Authorization: Bearer <api key> is required");
    }
    let resp = match (req.method(), path.as_str()) {
        (&Method::POST, "/v1/publish") => publish_one(req, &shared).await,
        (&Method::POST, "/v1/publish/batch") => publish_batch(req, &shared).await,
        (&Method::POST, "/v1/broadcast") => broadcast(req, &shared).await,
        (&Method::GET, "/v1/stream") => stream::upgrade(req, shared.clone(), slot, shutdown),
        (&Method::GET, "/v1/stats") => json(StatusCode::OK, &observe::stats(&shared).await),
        (&Method::GET, "/metrics") => {
            text("text/plain; version=0.0.4; charset=utf-8", observe::prometheus(&shared))
        }
        (&Method::GET, "/dashboard") => dashboard(),
        (&Method::GET, "/debug/histograms") => {
            let reset = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "reset=1"));
            text("text/plain; charset=utf-8", observe::hgrm_text(&shared, reset).await)
        }
        (m, p) if p.starts_with("/v1/users/") => {
            user_route(m.clone(), &p["/v1/users/".len()..], &shared).await
        }
        (
            _,
            "/v1/publish" | "/v1/publish/batch" | "/v1/broadcast" | "/v1/stream" | "/v1/stats" | "/metrics"
            | "/dashboard",
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

/// Reads a body of at most `limit` bytes within `--idle-timeout`; `Err` is
/// a ready 413/408/400 response.
async fn read_body(req: Request<Incoming>, limit: usize, within: Duration) -> Result<Bytes, Response<Body>> {
    match tokio::time::timeout(within, Limited::new(req.into_body(), limit).collect()).await {
        Ok(Ok(c)) => Ok(c.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            Err(error(413, "payload_too_large", &format!("body over {limit} bytes")))
        }
        Ok(Err(_)) => Err(error(400, "bad_request", "could not read the request body")),
        Err(_) => Err(error(408, "request_timeout", "the request body took too long")),
    }
}

async fn publish_one(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let body = match read_body(req, shared.config.max_payload, shared.config.idle_timeout).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match publish::publish_items(shared, &[&body], true, publish::Admission::Refuse).await.pop() {
        Some(Ok(p)) => json(StatusCode::OK, &p.to_json()),
        Some(Err(e)) => publish_error(&e),
        None => publish_error(&PublishError::Unavailable),
    }
}

/// Body limit for a batch: every item at the payload limit, plus separators.
fn batch_limit(shared: &Shared) -> usize {
    batch::MAX_ITEMS.saturating_mul(shared.config.max_payload + 2).min(64 << 20)
}

async fn publish_batch(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let body = match read_body(req, batch_limit(shared), shared.config.idle_timeout).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let items = match batch::split(&body) {
        Ok(items) => items,
        Err(e) => return error(400, e.code, &e.message),
    };
    let results = publish::publish_items(shared, &items, true, publish::Admission::Refuse).await;
    let mut out = String::with_capacity(16 + 32 * results.len());
    out.push_str("{\"results\":");
    publish::write_results(&mut out, &results);
    out.push('}');
    json_text(StatusCode::OK, out)
}

async fn broadcast(req: Request<Incoming>, shared: &Shared) -> Response<Body> {
    let body = match read_body(req, shared.config.max_payload, shared.config.idle_timeout).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let parsed = match protocol::parse_broadcast(&body, &shared.redactor) {
        Ok(p) => p,
        Err(e) => return error(400, e.code, &e.message),
    };
    if let Some(engine) = &shared.cluster {
        return match publish::broadcast_cluster(engine, &parsed.event).await {
            Ok(nodes) => json(StatusCode::OK, &serde_json::json!({"nodes": nodes})),
            Err(e) => publish_error(&e),
        };
    }
    match publish::broadcast(shared, parsed.event).await {
        Ok(o) => json(StatusCode::OK, &serde_json::json!({"users": o.users, "delivered": o.delivered})),
        Err(e) => publish_error(&e),
    }
}

/// `GET`/`DELETE /v1/users/{id}` in cluster mode: figures and closes
/// across every node, through Redis.
async fn cluster_user_route(method: Method, user: UserId, engine: &crate::cluster::Engine) -> Response<Body> {
    let unavailable = |e: crate::cluster::EngineError| error(503, "engine_unavailable", &e.to_string());
    match method {
        Method::GET => match engine.user_figures(&user).await {
            Ok(Some(f)) => json(
                StatusCode::OK,
                &serde_json::json!({
                    "user": user.as_str(), "connections": f.connections, "seq": f.seq,
                    "history": f.history, "history_bytes": f.history_bytes, "epoch": f.epoch,
                }),
            ),
            Ok(None) => json(
                StatusCode::OK,
                &serde_json::json!({"user": user.as_str(), "connections": 0, "seq": 0, "history": 0}),
            ),
            Err(e) => unavailable(e),
        },
        Method::DELETE => match engine.drop_user(&user).await {
            Ok(n) => json(StatusCode::OK, &serde_json::json!({"closed": n})),
            Err(e) => unavailable(e),
        },
        _ => error(405, "method_not_allowed", "use GET or DELETE"),
    }
}

async fn user_route(method: Method, raw_id: &str, shared: &Shared) -> Response<Body> {
    let user = match UserId::parse(raw_id) {
        Ok(u) => u,
        Err(e) => return error(400, e.code, &e.message),
    };
    if let Some(engine) = &shared.cluster {
        return cluster_user_route(method, user, engine).await;
    }
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
