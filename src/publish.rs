//! The publisher side of the data path, shared by every publish endpoint
//! (`/v1/publish`, `/v1/publish/batch`, `/v1/broadcast`, `/v1/stream`):
//! size-check → parse and validate → route → reserve ring room → push.
//!
//! Admission is all-or-nothing: room is reserved on every target shard's ring
//! before anything is pushed, so a publish that gets 503 left no trace. The
//! only waits are for the shards' replies; nothing here blocks a shard.
//!
//! A batch (or a `users` list) that needs more of a shard's ring than half
//! its capacity is applied in ring-sized steps instead ([`submit_stepwise`]),
//! waiting for room between steps, so no publish is refused for its size
//! alone (contract §6). A publisher stream always goes stepwise and waits
//! until its items are applied before reading on; without acks it waits on
//! one fence per shard rather than an ack per item.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::acks::Acks;
use crate::protocol::{self, InvalidInput, PreparedEvent, PublishRequest, Target, UserId};
use crate::shard::{Batch, BroadcastOutcome, Command, Delivery, Permit, PublishCmd};
use crate::shared::Shared;

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
    /// Cluster mode: Redis could not be reached; the outcome is unknown, so
    /// retry with the same `id`.
    #[error("the cluster engine is unavailable ({0}); retry with the same id")]
    EngineUnavailable(String),
}

impl PublishError {
    pub fn status(&self) -> u16 {
        match self {
            PublishError::Invalid(_) => 400,
            PublishError::TooLarge { .. } => 413,
            PublishError::Overloaded | PublishError::Unavailable | PublishError::EngineUnavailable(_) => 503,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            PublishError::Invalid(e) => e.code,
            PublishError::TooLarge { .. } => "payload_too_large",
            PublishError::Overloaded => "overloaded",
            PublishError::Unavailable => "unavailable",
            PublishError::EngineUnavailable(_) => "engine_unavailable",
        }
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}})
    }
}

/// Replies still to come from the shards: slots of the request's [`Acks`]
/// block (`None`: no reply was asked for).
pub enum Pending {
    One(Option<usize>),
    Many(Vec<(UserId, Option<usize>)>),
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
        let one = |d: &Delivery, user: Option<&UserId>| {
            let mut v = serde_json::json!({"seq": d.seq, "delivered": d.delivered});
            if let Some(u) = user {
                v["user"] = serde_json::Value::from(u.as_str());
            }
            if d.duplicate {
                v["duplicate"] = serde_json::Value::Bool(true);
            }
            v
        };
        match self {
            Published::One(d) => one(d, None),
            Published::Many(list) => serde_json::json!({
                "results": list.iter().map(|(u, d)| one(d, Some(u))).collect::<Vec<_>>()
            }),
            Published::Accepted => serde_json::json!({"accepted": true}),
        }
    }

    /// Appends this result's JSON to `out`; the common single-user case is
    /// formatted directly (no intermediate JSON tree), since it is written
    /// once per item on the publisher stream.
    pub fn write_json(&self, out: &mut String) {
        match self {
            Published::One(d) if !d.duplicate => {
                out.push_str("{\"seq\":");
                out.push_str(itoa::Buffer::new().format(d.seq));
                out.push_str(",\"delivered\":");
                out.push_str(itoa::Buffer::new().format(d.delivered));
                out.push('}');
            }
            other => out.push_str(&other.to_json().to_string()),
        }
    }
}

use crate::protocol::unix_ms;

/// Size-checks and parses one raw publish object.
pub fn parse_raw(shared: &Shared, raw: &[u8]) -> Result<PublishRequest, PublishError> {
    let limit = shared.config.max_payload;
    if raw.len() > limit {
        return Err(PublishError::TooLarge { size: raw.len(), limit });
    }
    Ok(protocol::parse_publish(raw, &shared.redactor)?)
}

/// Commands one step may put in a shard's ring: half of it, so a step
/// fits beside other publishers' traffic.
fn step_size(shared: &Shared) -> usize {
    (shared.config.ring_capacity / 2).max(1)
}

/// How long a stepwise batch waits for ring room for one step before the
/// rest of it is answered 503 (only a shard stalled that long does this).
const STEP_WAIT: Duration = Duration::from_secs(5);

/// The shard of each of an item's users, in target order; a single user
/// (the common case) needs no list.
enum Shards {
    One(usize),
    Many(Vec<usize>),
}

impl Shards {
    fn as_slice(&self) -> &[usize] {
        match self {
            Shards::One(s) => std::slice::from_ref(s),
            Shards::Many(v) => v,
        }
    }
}

/// A parsed item with the shard of each of its users.
type Routed = Result<(PublishRequest, Shards), PublishError>;

/// Routes every target once; also returns how many commands each shard gets.
fn route(shared: &Shared, items: Vec<Result<PublishRequest, PublishError>>) -> (Vec<Routed>, Vec<usize>) {
    let mut counts = vec![0usize; shared.shards.len()];
    let router = shared.router.view();
    let routed = items
        .into_iter()
        .map(|r| {
            r.map(|req| {
                let shards = match &req.target {
                    Target::One(u) => Shards::One(router.shard_for(u)),
                    Target::Many(us) => Shards::Many(us.iter().map(|u| router.shard_for(u)).collect()),
                };
                shards.as_slice().iter().for_each(|&s| counts[s] += 1);
                (req, shards)
            })
        })
        .collect();
    (routed, counts)
}

/// What every command of one request shares.
struct Stamp {
    accepted: Instant,
    ts_ms: u64,
}

/// Who answers a request's commands.
#[derive(Clone, Copy)]
enum Answers<'a> {
    /// Nobody: no result per event.
    None,
    /// Each command, through an [`crate::acks::Ack`] of its own.
    Each(&'a Arc<Acks>),
    /// The batch command carrying it ([`push_step`]); each command only
    /// knows its slot.
    ByBatch,
}

/// Turns an item into one command per user, in target order, handing each
/// to `push` with its shard; result slots are taken from `next_slot` on.
/// Returns the replies to wait for. A single-user item moves its parts into
/// its command (no clone, no list).
fn commands(
    req: PublishRequest,
    shards: &Shards,
    stamp: &Stamp,
    answers: Answers<'_>,
    next_slot: &mut usize,
    mut push: impl FnMut(usize, PublishCmd),
) -> Pending {
    let mut take_slot = || {
        let slot = *next_slot;
        *next_slot += 1;
        let short = crate::acks::slot_u32(slot);
        match answers {
            Answers::None => (None, None, 0),
            Answers::Each(acks) => (Some(slot), Some(acks.ack(slot)), short),
            Answers::ByBatch => (Some(slot), None, short),
        }
    };
    let cmd = |user, event, id, (reply, slot)| PublishCmd {
        user,
        event,
        accepted: stamp.accepted,
        ts_ms: stamp.ts_ms,
        id,
        reply,
        slot,
    };
    match (req.target, shards) {
        (Target::One(user), Shards::One(s)) => {
            let (mine, reply, slot) = take_slot();
            push(*s, cmd(user, req.event, req.id, (reply, slot)));
            Pending::One(mine)
        }
        (target, shards) => {
            let users = match target {
                Target::One(u) => vec![u],
                Target::Many(us) => us,
            };
            let mut pending = Vec::with_capacity(users.len());
            for (user, &s) in users.into_iter().zip(shards.as_slice()) {
                let (mine, reply, slot) = take_slot();
                push(s, cmd(user.clone(), req.event.clone(), req.id.clone(), (reply, slot)));
                pending.push((user, mine));
            }
            Pending::Many(pending)
        }
    }
}

/// Commands (one per user of every item) a request will submit.
fn command_count(items: &[Routed]) -> usize {
    items.iter().map(|r| r.as_ref().map_or(0, |(_, shards)| shards.as_slice().len())).sum()
}

/// Submits items too large for one reservation: commands are buffered per
/// shard and pushed a step at a time, waiting for room between steps. With
/// `per_item` every command carries an ack (slot by slot); without, each
/// shard that gets commands gets a [`Command::Fence`] after them, in slot
/// `s` of `acks`, so the caller can wait until everything was applied; the
/// items behind each shard's fence are returned beside the results. An item
/// with a command in a step that could not be pushed is reported
/// `Unavailable` instead of lost.
async fn submit_stepwise(
    shared: &Shared,
    items: Vec<Routed>,
    counts: &[usize],
    acks: &Arc<Acks>,
    per_item: bool,
) -> (Vec<Result<Pending, PublishError>>, Vec<Runs>) {
    let stamp = Stamp { accepted: Instant::now(), ts_ms: unix_ms() };
    let mut slot = 0;
    let (answers, batch_acks) = if per_item { (Answers::ByBatch, Some(acks)) } else { (Answers::None, None) };
    let step = step_size(shared);
    let deadline = tokio::time::Instant::now() + STEP_WAIT;
    let mut steps: Vec<Step> = counts.iter().map(|&n| Step::new(!per_item, n)).collect();
    // One item's commands, pushed into the buffers one at a time so that no
    // buffer ever holds more than a step (a `users` list may be long).
    let mut item_cmds: Vec<(usize, PublishCmd)> = Vec::new();
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let (req, shards) = match item {
            Ok(routed) => routed,
            Err(e) => {
                out.push(Err(e));
                continue;
            }
        };
        let index = out.len();
        out.push(Ok(commands(req, &shards, &stamp, answers, &mut slot, |s, cmd| item_cmds.push((s, cmd)))));
        for (s, cmd) in item_cmds.drain(..) {
            steps[s].add(cmd, index, step);
            if steps[s].cmds.len() >= step {
                steps[s].push(shared, s, deadline, &mut out, batch_acks, None).await;
            }
        }
    }
    let mut fenced = Vec::new();
    for (s, st) in steps.iter_mut().enumerate() {
        let all = st.all.take().unwrap_or_default();
        let fence = (!all.is_empty()).then(|| acks.ack(s));
        st.push(shared, s, deadline, &mut out, batch_acks, fence).await;
        fenced.push(all);
    }
    (out, fenced)
}

/// One shard's events waiting to be pushed (as one batch command), and the
/// items they belong to.
struct Step {
    cmds: Vec<PublishCmd>,
    /// Commands of the request still to come for this shard: each batch's
    /// vector is sized for its share once (a full step, or the rest),
    /// rather than grown by doubling from empty — ten reallocations and a
    /// copy of every command for a message of a thousand.
    left: usize,
    /// The items with a command in `cmds`.
    items: Runs,
    /// When the request ends with a fence on this shard (no ack per item):
    /// the items behind the fence, over the whole request.
    all: Option<Runs>,
}

impl Step {
    /// `count`: the commands the request has for this shard.
    fn new(fenced: bool, count: usize) -> Self {
        Step { cmds: Vec::new(), left: count, items: Runs::default(), all: fenced.then(Runs::default) }
    }

    /// `step`: the most one batch takes (what an empty batch is sized for,
    /// at most).
    fn add(&mut self, cmd: PublishCmd, item: usize, step: usize) {
        if self.cmds.capacity() == 0 {
            self.cmds.reserve_exact(self.left.clamp(1, step));
        }
        self.left = self.left.saturating_sub(1);
        self.cmds.push(cmd);
        self.items.add(item);
        if let Some(all) = self.all.as_mut() {
            all.add(item);
        }
    }

    /// Pushes the step into shard `s` (its results answered through
    /// `acks`, if given), and the fence after it if there is one; when it
    /// could not be, its items fail.
    async fn push(
        &mut self,
        shared: &Shared,
        s: usize,
        deadline: tokio::time::Instant,
        out: &mut [Result<Pending, PublishError>],
        acks: Option<&Arc<Acks>>,
        fence: Option<crate::shard::Ack>,
    ) {
        if !push_step(shared, s, &mut self.cmds, acks, fence, deadline).await {
            for i in self.items.iter() {
                out[i] = Err(PublishError::Unavailable);
            }
        }
        self.items = Runs::default();
    }
}

/// Item indexes, added in ascending order (repeats ignored), kept as runs
/// of consecutive indexes: a stream message's items usually all go to one
/// shard, so this is one range rather than a list as long as the message.
#[derive(Default)]
struct Runs(Vec<Range<usize>>);

impl Runs {
    fn add(&mut self, item: usize) {
        match self.0.last_mut() {
            Some(r) if r.end > item => {} // a repeat (an item's second user on this shard)
            Some(r) if r.end == item => r.end += 1,
            _ => self.0.push(item..item + 1),
        }
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().flat_map(Clone::clone)
    }
}

/// Pushes one step's events into shard `s` as one batch command (a ring
/// slot per event; with `acks`, answering each event's result slot), then
/// the fence if there is one, waiting for room until `deadline`; past it
/// the commands are dropped (their replies then fail) and `false` is
/// returned.
async fn push_step(
    shared: &Shared,
    s: usize,
    buf: &mut Vec<PublishCmd>,
    acks: Option<&Arc<Acks>>,
    fence: Option<crate::shard::Ack>,
    deadline: tokio::time::Instant,
) -> bool {
    let slots = buf.len() + usize::from(fence.is_some());
    if slots == 0 {
        return true;
    }
    let ring = &shared.shards[s].ring;
    loop {
        if let Ok(mut permit) = ring.reserve(slots) {
            match buf.len() {
                0 => {}
                1 => {
                    let mut cmd = buf.remove(0);
                    cmd.reply = acks.map(|a| a.ack(cmd.slot as usize));
                    permit.push(Command::Publish(cmd));
                }
                n => {
                    let batch = Batch { events: std::mem::take(buf), acks: acks.map(|a| a.batch(n)) };
                    permit.push_counted(Command::PublishBatch(batch), n);
                }
            }
            if let Some(f) = fence {
                permit.push(Command::Fence(f));
            }
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            crate::metrics::bump(&shared.shards[s].metrics.ring_full, 1);
            buf.clear();
            return false;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Submits many publishes (a batch or a stream frame) in order, with one
/// reservation and one wake-up per shard instead of one per item.
///
/// Each item is all-or-nothing: an item with a target on a shard whose ring
/// cannot take this batch's commands gets `Overloaded` and pushes nothing;
/// the other items proceed. Items that were already errors pass through.
fn submit_all(
    shared: &Shared,
    routed: Vec<Routed>,
    counts: &[usize],
    acks: Option<&Arc<Acks>>,
) -> Vec<Result<Pending, PublishError>> {
    let stamp = Stamp { accepted: Instant::now(), ts_ms: unix_ms() };
    let mut slot = 0;
    let answers = acks.map_or(Answers::None, Answers::Each);
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
            if shards.as_slice().iter().any(|&s| permits[s].is_none()) {
                return Err(PublishError::Overloaded);
            }
            Ok(commands(req, &shards, &stamp, answers, &mut slot, |s, cmd| {
                if let Some(p) = permits[s].as_mut() {
                    p.push(Command::Publish(cmd));
                }
            }))
        })
        .collect();
    drop(permits); // wakes each shard once
    out
}

/// What a publish does when a target shard's ring is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Answer 503 `overloaded` at once (HTTP publishes: the client retries).
    Refuse,
    /// Wait for room (up to 5 s per step) and apply the frame before the
    /// next one is read: a publisher stream is flow-controlled through its
    /// socket instead of having items refused (fire-and-forget ones too).
    Wait,
}

/// Parses, submits and resolves the items of a publish, a batch or a
/// stream frame, in order, with one reservation per shard for all of them
/// ([`submit_all`]), or in ring-sized steps when they need more than that
/// ([`submit_stepwise`]). Without `want_reply` accepted items resolve at once
/// to [`Published::Accepted`] (stepwise ones once applied). Failed items are
/// counted in the API error counters.
pub async fn publish_items(
    shared: &Shared,
    items: &[&[u8]],
    want_reply: bool,
    admission: Admission,
) -> Vec<Result<Published, PublishError>> {
    let parsed = items.iter().map(|raw| parse_raw(shared, raw)).collect();
    if let Some(engine) = &shared.cluster {
        return count_errors(shared, cluster_publish(engine, parsed, want_reply).await);
    }
    let (routed, counts) = route(shared, parsed);
    let stepwise = admission == Admission::Wait || !counts.iter().all(|&n| n <= step_size(shared));
    // A fire-and-forget caller still waits for room and for its items to be
    // applied, through one fence per shard instead of an ack per item.
    let acks = match (want_reply, stepwise) {
        (true, _) => Some(Acks::new(command_count(&routed))),
        (false, true) => Some(Acks::new(shared.shards.len())),
        (false, false) => None,
    };
    let (mut submitted, fenced) = match acks.as_ref().filter(|_| stepwise) {
        Some(acks) => submit_stepwise(shared, routed, &counts, acks, want_reply).await,
        None => (submit_all(shared, routed, &counts, acks.as_ref()), Vec::new()),
    };
    if let Some(a) = &acks {
        a.seal();
        a.settled().await;
        // A fence left unanswered (its shard dropped it): its items may not
        // have been applied either. (Only fenced shards have items here; with
        // an ack per item, slot `s` is an item's, not a fence's.)
        let dropped = |(s, items): &(usize, &Runs)| !items.is_empty() && a.get(*s).is_none();
        for (s, items) in fenced.iter().enumerate().filter(dropped) {
            tracing::debug!(shard = s, "a fence was dropped");
            for i in items.iter() {
                submitted[i] = Err(PublishError::Unavailable);
            }
        }
    }
    let out = submitted
        .into_iter()
        .map(|r| r.and_then(|p| resolve(&p, acks.as_deref())))
        .map(|r| r.map(|p| if want_reply { p } else { Published::Accepted }))
        .collect();
    count_errors(shared, out)
}

/// Counts failed items in the API error counters.
fn count_errors(
    shared: &Shared,
    out: Vec<Result<Published, PublishError>>,
) -> Vec<Result<Published, PublishError>> {
    for e in out.iter().filter_map(|r| r.as_ref().err()) {
        shared.api_errors.count(e.code());
    }
    out
}

/// Cluster mode: every (item, user) goes to Redis as one publish script
/// call; all calls are issued together, in order, on the engine's
/// multiplexed connection (so they share round trips, and one user's calls
/// run in publish order). `delivered` counts the nodes that received it.
async fn cluster_publish(
    engine: &crate::cluster::Engine,
    items: Vec<Result<PublishRequest, PublishError>>,
    want_reply: bool,
) -> Vec<Result<Published, PublishError>> {
    if !engine.health.is_up() {
        // Fail fast while Redis is known to be down (the heartbeat notices its return).
        let e = PublishError::EngineUnavailable("Redis is unreachable".into());
        return items.into_iter().map(|r| r.and(Err(e.clone()))).collect();
    }
    let ts_ms = unix_ms();
    let at_us = protocol::unix_us();
    let prepared: Vec<_> =
        items.into_iter().map(|r| r.map(|req| (protocol::event_tail(&req.event, ts_ms), req))).collect();
    let mut calls = Vec::new();
    for (tail, req) in prepared.iter().flatten() {
        let ev = crate::cluster::Outgoing { tail, priority: req.event.priority, at_us };
        let users: &[UserId] = match &req.target {
            Target::One(u) => std::slice::from_ref(u),
            Target::Many(us) => us,
        };
        for user in users {
            calls.push(crate::cluster::PublishItem { user, ev, id: req.id.as_deref() });
        }
    }
    let mut results = engine.publish_many(&calls).await.into_iter();
    prepared
        .iter()
        .map(|r| {
            let (_, req) = r.as_ref().map_err(Clone::clone)?;
            let mut one = |u: &UserId| -> Result<(UserId, Delivery), PublishError> {
                let a = results
                    .next()
                    .ok_or(PublishError::Unavailable)?
                    .map_err(|e| PublishError::EngineUnavailable(e.to_string()))?;
                Ok((u.clone(), Delivery { seq: a.seq, delivered: a.nodes, duplicate: a.duplicate }))
            };
            let p = match &req.target {
                Target::One(u) => Published::One(one(u)?.1),
                Target::Many(us) => {
                    let all: Vec<_> = us.iter().map(&mut one).collect();
                    Published::Many(all.into_iter().collect::<Result<_, _>>()?)
                }
            };
            Ok(if want_reply { p } else { Published::Accepted })
        })
        .collect()
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

/// An item's results, read from the request's settled [`Acks`] block; a
/// slot left unanswered (its command was dropped) is `Unavailable`.
pub fn resolve(p: &Pending, acks: Option<&Acks>) -> Result<Published, PublishError> {
    let get = |slot: usize| acks.and_then(|a| a.get(slot)).ok_or(PublishError::Unavailable);
    match p {
        Pending::One(None) => Ok(Published::Accepted),
        Pending::One(Some(slot)) => get(*slot).map(Published::One),
        Pending::Many(list) => {
            let mut out = Vec::with_capacity(list.len());
            for (user, slot) in list {
                let Some(slot) = slot else { return Ok(Published::Accepted) };
                out.push((user.clone(), get(*slot)?));
            }
            Ok(Published::Many(out))
        }
    }
}

/// Cluster mode: asks every node to publish `event` to its users with a
/// live connection; returns the nodes that received the request.
pub async fn broadcast_cluster(
    engine: &crate::cluster::Engine,
    event: &PreparedEvent,
) -> Result<u64, PublishError> {
    let tail = protocol::event_tail(event, unix_ms());
    engine
        .broadcast(&tail, event.priority, protocol::unix_us())
        .await
        .map_err(|e| PublishError::EngineUnavailable(e.to_string()))
}

/// Sends one event to every user with a live connection, on every shard.
pub async fn broadcast(shared: &Shared, event: PreparedEvent) -> Result<BroadcastOutcome, PublishError> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_results_are_the_json_of_each_result() {
        let d = |seq, delivered, duplicate| Delivery { seq, delivered, duplicate };
        let cases = [
            Published::One(d(1, 0, false)),
            Published::One(d(u64::MAX, u32::MAX, false)),
            Published::One(d(7, 0, true)),
            Published::Many(vec![(UserId::parse("u1").unwrap(), d(3, 2, false))]),
            Published::Accepted,
        ];
        for p in &cases {
            let mut out = String::new();
            p.write_json(&mut out);
            let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(parsed, p.to_json(), "{out}");
        }
    }

    #[test]
    fn runs_keep_every_item_once_in_order() {
        let mut r = Runs::default();
        assert!(r.is_empty());
        for i in [0, 0, 1, 2, 2, 5, 6, 9, 9, 9, 10] {
            r.add(i);
        }
        assert_eq!(r.iter().collect::<Vec<_>>(), vec![0, 1, 2, 5, 6, 9, 10]);
        assert_eq!(r.0, vec![0..3, 5..7, 9..11]);
    }
}
