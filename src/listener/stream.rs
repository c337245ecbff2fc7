//! `GET /v1/stream`: a publisher WebSocket for high rates.
//!
//! Each text frame is one publish object or NDJSON of up to 1,000. With
//! `?acks=1` every frame is answered with `{"type":"ack","results":[...]}`
//! (items as in a batch); without acks only failures come back, as
//! `{"type":"error","code","message","index"}`. Items of one frame are
//! submitted in order before any reply is awaited, so a frame costs one
//! ring push per item and the stream never waits on a shard without acks.

use std::sync::Arc;

use bytes::Bytes;
use fastwebsockets::{FragmentCollector, Frame, OpCode, Payload};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio_util::sync::CancellationToken;

use crate::batch;
use crate::broker::Shared;
use crate::listener::api::error;
use crate::publish;

/// Largest stream frame: a full batch of maximum-size items, capped.
fn max_frame(shared: &Shared) -> usize {
    batch::MAX_ITEMS.saturating_mul(shared.config.max_payload + 1).min(64 << 20)
}

/// Answers the upgrade and spawns the stream's task.
pub fn upgrade(
    mut req: Request<Incoming>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) -> Response<Full<Bytes>> {
    let acks = req.uri().query().is_some_and(|q| q.split('&').any(|p| p == "acks=1" || p == "acks=true"));
    let (resp, fut) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(v) => v,
        Err(e) => {
            return error(426, "upgrade_required", &format!("GET /v1/stream needs a WebSocket upgrade: {e}"))
        }
    };
    tokio::spawn(async move {
        let ws = match fut.await {
            Ok(ws) => ws,
            Err(e) => {
                tracing::debug!(error = %e, "publisher stream upgrade failed");
                return;
            }
        };
        run(ws, shared, acks, shutdown).await;
    });
    let (parts, _) = resp.into_parts();
    Response::from_parts(parts, Full::new(Bytes::new()))
}

async fn run(
    mut ws: fastwebsockets::WebSocket<TokioIo<hyper::upgrade::Upgraded>>,
    shared: Arc<Shared>,
    acks: bool,
    shutdown: CancellationToken,
) {
    ws.set_max_message_size(max_frame(&shared));
    ws.set_auto_close(true);
    ws.set_auto_pong(true);
    let mut ws = FragmentCollector::new(ws);
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = ws.write_frame(Frame::close(1001, b"server shutting down")).await;
                return;
            }
            f = ws.read_frame() => match f {
                Ok(f) => f,
                Err(_) => return,
            },
        };
        let replies = match frame.opcode {
            OpCode::Close => return,
            OpCode::Text => handle_frame(&shared, &frame.payload, acks).await,
            OpCode::Binary => vec![serde_json::json!({
                "type": "error", "code": "bad_request", "message": "send publish objects as text frames", "index": 0
            })
            .to_string()],
            _ => continue,
        };
        for r in replies {
            let payload = Payload::Owned(r.into_bytes());
            if ws.write_frame(Frame::text(payload)).await.is_err() {
                return;
            }
        }
    }
}

/// Submits one frame's items; returns the frames to send back.
async fn handle_frame(shared: &Shared, payload: &[u8], acks: bool) -> Vec<String> {
    let items = match batch::split(payload) {
        Ok(items) => items,
        Err(e) => {
            shared.api_errors.count(e.code);
            let err = serde_json::json!({"type": "error", "code": e.code, "message": e.message, "index": 0});
            return vec![err.to_string()];
        }
    };
    let results = publish::publish_items(shared, &items, acks).await;
    if acks {
        let mut ack = String::with_capacity(32 + 32 * results.len());
        ack.push_str("{\"type\":\"ack\",\"results\":");
        publish::write_results(&mut ack, &results);
        ack.push('}');
        return vec![ack];
    }
    results
        .iter()
        .enumerate()
        .filter_map(|(index, r)| {
            let e = r.as_ref().err()?;
            let err = serde_json::json!({
                "type": "error", "code": e.code(), "message": e.to_string(), "index": index
            });
            Some(err.to_string())
        })
        .collect()
}
