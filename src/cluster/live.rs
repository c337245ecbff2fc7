//! Live events from other nodes: the node's one Pub/Sub connection.
//!
//! The subscriber task holds the set of user channels this node's shards
//! want (a shard asks when a user's first local connection arrives and
//! releases when the last one leaves) plus the broadcast channel, and hands
//! every message, decoded, to the sink the broker gives it (which pushes it
//! into the owning shard's ring). When the connection drops it reconnects
//! with backoff, subscribes to everything again and tells the sink to
//! resync: messages published meanwhile were lost, and the shards fill the
//! gap from history.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::keys::Keys;
use crate::protocol::{Priority, UserId};

/// One decoded Pub/Sub message.
#[derive(Debug)]
pub enum Live {
    /// An event for a user.
    Event { user: UserId, epoch: Arc<str>, seq: u64, priority: Priority, at_us: u64, body: Bytes },
    /// Close these connections (`<node>/<conn>`) with 4001: over the user's limit.
    Evict { user: UserId, members: Vec<String> },
    /// Close all of the user's connections (4000): `DELETE /v1/users/{id}`.
    Drop { user: UserId },
    /// Publish this event to every user with a live connection here.
    Broadcast { bid: Arc<str>, priority: Priority, at_us: u64, tail: Bytes },
    /// Messages may have been lost (the subscription was re-established):
    /// every shard checks its users against history.
    Resync,
}

/// Where decoded messages go. `Err` hands the message back when the target
/// cannot take it now (its ring is full); the subscriber retries shortly.
pub trait Sink: Send + Sync + 'static {
    fn deliver(&self, msg: Live) -> Result<(), Live>;
}

/// A request from a shard.
pub enum Request {
    /// Subscribe to a user's channel; the reply says when it is in place.
    Subscribe(UserId, oneshot::Sender<bool>),
    Unsubscribe(UserId),
}

/// Decodes one message on `channel`.
pub fn decode(keys: &Keys, channel: &str, payload: &[u8]) -> Option<Live> {
    if channel == keys.broadcast_channel() {
        // b|bid|priority|at_us|tail
        let mut it = payload.splitn(5, |&b| b == b'|');
        let (_, bid, prio, at, tail) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
        return Some(Live::Broadcast {
            bid: std::str::from_utf8(bid).ok()?.into(),
            priority: Priority::parse(std::str::from_utf8(prio).ok()?).ok()?,
            at_us: std::str::from_utf8(at).ok()?.parse().ok()?,
            tail: Bytes::copy_from_slice(tail),
        });
    }
    let user = UserId::parse(keys.user_of_channel(channel)?).ok()?;
    match payload.first()? {
        b'e' => {
            // e|epoch|seq|priority|at_us|body
            let mut it = payload.splitn(6, |&b| b == b'|');
            let (_, epoch, seq, prio, at, body) =
                (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
            let text = |b: &[u8]| std::str::from_utf8(b).ok().map(str::to_owned);
            Some(Live::Event {
                user,
                epoch: text(epoch)?.into(),
                seq: text(seq)?.parse().ok()?,
                priority: Priority::parse(&text(prio)?).ok()?,
                at_us: text(at)?.parse().ok()?,
                body: Bytes::copy_from_slice(body),
            })
        }
        b'x' => {
            let rest = std::str::from_utf8(payload.get(2..)?).ok()?;
            Some(Live::Evict { user, members: rest.split(' ').map(str::to_owned).collect() })
        }
        b'd' => Some(Live::Drop { user }),
        _ => None,
    }
}

/// Runs the subscriber until `requests` closes.
pub async fn run(
    clients: Vec<redis::Client>,
    keys: Keys,
    sink: Arc<dyn Sink>,
    mut requests: mpsc::UnboundedReceiver<Request>,
    health: Arc<super::link::Health>,
) {
    let mut wanted: HashSet<UserId> = HashSet::new();
    let mut backoff = Duration::from_millis(50);
    let mut attempt = 0usize;
    let mut first = true;
    loop {
        let client = &clients[attempt % clients.len()];
        attempt += 1;
        let pubsub = match tokio::time::timeout(super::link::CALL_TIMEOUT, client.get_async_pubsub()).await {
            Ok(Ok(p)) => p,
            _ => {
                health.set_pubsub(false);
                // Requests keep arriving while down: track them, answer "not in place".
                let deadline = tokio::time::sleep(backoff);
                tokio::pin!(deadline);
                loop {
                    tokio::select! {
                        _ = &mut deadline => break,
                        r = requests.recv() => match r {
                            Some(r) => track(&mut wanted, r, false),
                            None => return,
                        },
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        let (mut sink_half, mut stream) = pubsub.split();
        let mut channels: Vec<String> = wanted.iter().map(|u| keys.channel(u)).collect();
        channels.push(keys.broadcast_channel());
        let mut ok = true;
        for chunk in channels.chunks(512) {
            if sink_half.subscribe(chunk).await.is_err() {
                ok = false;
                break;
            }
        }
        if !ok {
            continue;
        }
        backoff = Duration::from_millis(50);
        health.set_pubsub(true);
        if !first {
            tracing::info!(channels = channels.len(), "resubscribed to Redis Pub/Sub");
            deliver(&*sink, Live::Resync).await;
        }
        first = false;
        loop {
            tokio::select! {
                msg = stream.next() => {
                    let Some(msg) = msg else { break };
                    if let Some(live) = decode(&keys, msg.get_channel_name(), msg.get_payload_bytes()) {
                        deliver(&*sink, live).await;
                    }
                }
                r = requests.recv() => {
                    let Some(r) = r else { return };
                    let ok = match &r {
                        Request::Subscribe(u, _) => sink_half.subscribe(keys.channel(u)).await.is_ok(),
                        Request::Unsubscribe(u) => sink_half.unsubscribe(keys.channel(u)).await.is_ok(),
                    };
                    track(&mut wanted, r, ok);
                }
            }
        }
        health.set_pubsub(false);
        tracing::warn!("lost the Redis Pub/Sub connection; reconnecting");
    }
}

/// Applies a request to the wanted set and answers a subscribe.
fn track(wanted: &mut HashSet<UserId>, r: Request, in_place: bool) {
    match r {
        Request::Subscribe(u, reply) => {
            wanted.insert(u);
            let _ = reply.send(in_place);
        }
        Request::Unsubscribe(u) => {
            wanted.remove(&u);
        }
    }
}

/// Hands a message to the sink, retrying while the target is full (bounded:
/// a message still refused after ~1 s is dropped; the seq gap it leaves is
/// filled from history when the user's next message arrives).
async fn deliver(sink: &dyn Sink, mut msg: Live) {
    for _ in 0..1000 {
        match sink.deliver(msg) {
            Ok(()) => return,
            Err(back) => msg = back,
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tracing::warn!("dropped a Pub/Sub message: its shard stayed full for a second");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_each_kind_and_refuses_garbage() {
        let keys = Keys::new("sy");
        let ch = "sy:ch:alice";
        match decode(&keys, ch, b"e|ep1|7|high|123|{\"type\":\"event\",\"seq\":7}") {
            Some(Live::Event { user, epoch, seq, priority, at_us, body }) => {
                assert_eq!(
                    (user.as_str(), &*epoch, seq, priority, at_us),
                    ("alice", "ep1", 7, Priority::High, 123)
                );
                assert_eq!(&body[..], b"{\"type\":\"event\",\"seq\":7}");
            }
            other => panic!("{other:?}"),
        }
        assert!(
            matches!(decode(&keys, ch, b"x|n1/c1 n2/c2"), Some(Live::Evict { members, .. }) if members == ["n1/c1", "n2/c2"])
        );
        assert!(matches!(decode(&keys, ch, b"d"), Some(Live::Drop { .. })));
        assert!(matches!(
            decode(&keys, "sy:broadcast", b"b|B1|low|5|,\"x\":1}"),
            Some(Live::Broadcast { priority: Priority::Low, at_us: 5, .. })
        ));
        for bad in [&b"e|ep|notanumber|high|1|{}"[..], b"e|ep|1|urgent|1|{}", b"q", b"", b"e|x"] {
            assert!(decode(&keys, ch, bad).is_none(), "{bad:?}");
        }
        assert!(decode(&keys, "sy:ch:bad user", b"d").is_none());
    }
}
