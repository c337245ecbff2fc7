//! The publisher side of the data path, shared by every publish endpoint
//! (`/v1/publish`, `/v1/publish/batch`, `/v1/broadcast`, `/v1/stream`):
//! size-check → parse and validate → route → reserve ring room → push.
//!
//! Admission is all-or-nothing: room is reserved on every target shard's ring
//! before anything is pushed, so a publish that gets 503 left no trace. The
//! only waits are for the shards' replies; nothing here blocks a shard.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use crate::broker::Shared;
use crate::protocol::{self, InvalidInput, PreparedEvent, PublishRequest, Target, UserId};
use crate::shard::{BroadcastOutcome, Command, Delivery, Permit, PublishCmd};

/// Why a publish was not applied.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Invalid(#[from] InvalidInput),
    #[error("publish object is {size} bytes; --max-payload is {limit}")]
    TooLarge { size: usize, limit: usize },
    #[error("the target shard is full; retry shortly")]
    Overloaded,
    #[error("the broker is shutting down")]
    Unavailable,
}

impl PublishError {
    pub fn status(&self) -> u16 {
        match self {
            PublishError::Invalid(_) => 400,
            PublishError::TooLarge { .. } => 413,
            PublishError::Overloaded | PublishError::Unavailable => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            PublishError::Invalid(e) => e.code,
            PublishError::TooLarge { .. } => "payload_too_large",
            PublishError::Overloaded => "overloaded",
            PublishError::Unavailable => "unavailable",
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}})
    }
}

/// Replies still to come from the shards.
pub enum Pending {
    One(Option<oneshot::Receiver<Delivery>>),
    Many(Vec<(UserId, Option<oneshot::Receiver<Delivery>>)>),
}

/// The applied result of one publish object.
pub enum Published {
    One(Delivery),
    Many(Vec<(UserId, Delivery)>),
    /// Fire-and-forget: accepted, no reply requested.
    Accepted,
}

impl Published {
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            Published::One(d) => serde_json::json!({"seq": d.seq, "delivered": d.delivered}),
            Published::Many(list) => serde_json::json!({
                "results": list.iter().map(|(u, d)| serde_json::json!({
                    "user": u.as_str(), "seq": d.seq, "delivered": d.delivered
                })).collect::<Vec<_>>()
            }),
            Published::Accepted => serde_json::json!({"accepted": true}),
        }
    }

    /// Appends this result's JSON to `out`; the common single-user case is
    /// formatted directly (no intermediate JSON tree), since it is written
    /// once per item on the publisher stream.
    pub fn write_json(&self, out: &mut String) {
        match self {
            Published::One(d) => {
                let _ = write!(out, "{{\"seq\":{},\"delivered\":{}}}", d.seq, d.delivered);
            }
            other => out.push_str(&other.to_json().to_string()),
        }
    }
}

/// Unix time in milliseconds.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Size-checks and parses one raw publish object.
pub fn parse_raw(shared: &Shared, raw: &[u8]) -> Result<PublishRequest, PublishError> {
    let limit = shared.config.max_payload;
    if raw.len() > limit {
        return Err(PublishError::TooLarge { size: raw.len(), limit });
    }
    let mut buf = raw.to_vec();
    Ok(protocol::parse_publish(&mut buf, &shared.redactor)?)
}

/// Size-checks, parses and submits one raw publish object.
pub fn submit_raw(shared: &Shared, raw: &[u8], want_reply: bool) -> Result<Pending, PublishError> {
    let req = parse_raw(shared, raw)?;
    submit_all(shared, vec![Ok(req)], want_reply).pop().unwrap_or(Err(PublishError::Unavailable))
}

/// Submits many publishes (a batch or a stream frame) in order, with one
/// reservation and one wake-up per shard instead of one per item.
///
/// Each item is all-or-nothing: an item with a target on a shard whose ring
/// cannot take this batch's commands gets `Overloaded` and pushes nothing;
/// the other items proceed. Items that were already errors pass through.
pub fn submit_all(
    shared: &Shared,
    items: Vec<Result<PublishRequest, PublishError>>,
    want_reply: bool,
) -> Vec<Result<Pending, PublishError>> {
    let accepted = Instant::now();
    let ts_ms = unix_ms();
    let nshards = shared.shards.len();
    // Route every target once.
    let routed: Vec<Result<(PublishRequest, Vec<usize>), PublishError>> = items
        .into_iter()
        .map(|r| {
            r.map(|req| {
                let shards = match &req.target {
                    Target::One(u) => vec![shared.router.shard_for(u)],
                    Target::Many(us) => us.iter().map(|u| shared.router.shard_for(u)).collect(),
                };
                (req, shards)
            })
        })
        .collect();
    let mut counts = vec![0usize; nshards];
    for (_, shards) in routed.iter().flatten() {
        for &s in shards {
            counts[s] += 1;
        }
    }
    // One reservation per shard; a shard that cannot take it all takes nothing.
    let mut permits: Vec<Option<Permit<'_, Command>>> = counts
        .iter()
        .enumerate()
        .map(|(s, &n)| if n == 0 { None } else { shared.shards[s].reserve(n).ok() })
        .collect();
    let out = routed
        .into_iter()
        .map(|r| {
            let (req, shards) = r?;
            if shards.iter().any(|&s| permits[s].is_none()) {
                return Err(PublishError::Overloaded);
            }
            let many = matches!(req.target, Target::Many(_));
            let users = match req.target {
                Target::One(u) => vec![u],
                Target::Many(us) => us,
            };
            let mut pending = Vec::with_capacity(users.len());
            for (user, s) in users.into_iter().zip(shards) {
                let (tx, rx) = if want_reply {
                    let (tx, rx) = oneshot::channel();
                    (Some(tx), Some(rx))
                } else {
                    (None, None)
                };
                if let Some(p) = permits[s].as_mut() {
                    p.push(Command::Publish(PublishCmd {
                        user: user.clone(),
                        event: req.event.clone(),
                        accepted,
                        ts_ms,
                        reply: tx,
                    }));
                }
                pending.push((user, rx));
            }
            Ok(if many { Pending::Many(pending) } else { Pending::One(pending.pop().and_then(|(_, rx)| rx)) })
        })
        .collect();
    drop(permits); // wakes each shard once
    out
}

/// Parses, submits and resolves the items of a batch or a stream frame, in
/// order, with one reservation per shard for all of them ([`submit_all`]).
/// Without `want_reply` accepted items resolve at once to
/// [`Published::Accepted`]. Failed items are counted in the API error counters.
pub async fn publish_items(
    shared: &Shared,
    items: &[&[u8]],
    want_reply: bool,
) -> Vec<Result<Published, PublishError>> {
    let parsed = items.iter().map(|raw| parse_raw(shared, raw)).collect();
    let mut out = Vec::with_capacity(items.len());
    for submitted in submit_all(shared, parsed, want_reply) {
        let r = match submitted {
            Ok(p) => resolve(p).await,
            Err(e) => Err(e),
        };
        if let Err(e) = &r {
            shared.api_errors.count(e.code());
        }
        out.push(r);
    }
    out
}

/// Appends the JSON array of per-item results (as in `/v1/publish/batch` and
/// stream acks): each a result object or an `{"error":{...}}` object.
pub fn write_results(out: &mut String, results: &[Result<Published, PublishError>]) {
    out.push('[');
    for (i, r) in results.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        match r {
            Ok(p) => p.write_json(out),
            Err(e) => out.push_str(&e.to_json().to_string()),
        }
    }
    out.push(']');
}

/// Waits for the shards' replies.
pub async fn resolve(p: Pending) -> Result<Published, PublishError> {
    match p {
        Pending::One(None) => Ok(Published::Accepted),
        Pending::One(Some(rx)) => rx.await.map(Published::One).map_err(|_| PublishError::Unavailable),
        Pending::Many(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (user, rx) in list {
                let Some(rx) = rx else { return Ok(Published::Accepted) };
                out.push((user, rx.await.map_err(|_| PublishError::Unavailable)?));
            }
            Ok(Published::Many(out))
        }
    }
}

/// Sends one event to every user with a live connection, on every shard.
pub async fn broadcast(shared: &Shared, event: Arc<PreparedEvent>) -> Result<BroadcastOutcome, PublishError> {
    let accepted = Instant::now();
    let ts_ms = unix_ms();
    let mut permits = Vec::with_capacity(shared.shards.len());
    for s in shared.shards.iter() {
        permits.push(s.reserve(1).map_err(|_| PublishError::Overloaded)?);
    }
    let mut replies = Vec::with_capacity(permits.len());
    for mut p in permits {
        let (tx, rx) = oneshot::channel();
        p.push(Command::Broadcast { event: event.clone(), accepted, ts_ms, reply: tx });
        replies.push(rx);
    }
    let mut total = BroadcastOutcome::default();
    for rx in replies {
        let o = rx.await.map_err(|_| PublishError::Unavailable)?;
        total.users += o.users;
        total.delivered += o.delivered;
    }
    Ok(total)
}
