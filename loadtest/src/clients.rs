//! The receiving side: client connections over WebSocket, SSE or NATS,
//! each checking every event it gets; churn and reconnects with resume.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use futures_util::FutureExt;
use serde_json::{json, Value};
use switchyard_load::check::ConnCheck;
use switchyard_load::sse::SseConn;
use switchyard_load::wsclient::{Message, WsClient};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::args::{Common, Peer};
use crate::shared::{broadcast_source, user_name, Run, EVERYONE};

/// A client connection over either transport.
pub(crate) enum Conn {
    Ws(Box<WsClient>),
    Sse(SseConn),
    Nats(Box<switchyard_load::nats::NatsConn>),
}

impl Conn {
    /// The next text message (a WebSocket text frame, an SSE message's data);
    /// `None` when the connection ended (text that is not UTF-8 ends it
    /// too). A WebSocket or NATS message is a view of the read buffer (no
    /// copy).
    pub(crate) async fn next_text(&mut self) -> Option<Utf8Bytes> {
        match self {
            Conn::Ws(ws) => loop {
                match ws.next().await? {
                    Message::Text(t) => return Utf8Bytes::try_from(t).ok(),
                    Message::Binary(_) => continue,
                }
            },
            Conn::Sse(s) => s.next().await.map(|m| m.data.into()),
            Conn::Nats(n) => Utf8Bytes::try_from(n.next().await?).ok(),
        }
    }

    /// Closes the connection, waiting at most 5 s for the peer.
    pub(crate) async fn close(&mut self) {
        let close = async {
            match self {
                Conn::Ws(ws) => ws.close().await,
                Conn::Sse(s) => s.close().await,
                Conn::Nats(n) => n.close().await,
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), close).await;
    }
}

pub(crate) fn mint_token(secret: &str, user: &str) -> anyhow::Result<String> {
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 3600;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &json!({"sub": user, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Opens one client connection (optionally resuming) and reads its welcome.
pub(crate) async fn connect(
    target: &str,
    common: &Common,
    user: usize,
    index: usize,
    resume: Option<(u64, &str)>,
) -> anyhow::Result<(Conn, Value)> {
    let name = user_name(user);
    let sse = common.transport.sse_for(index);
    let path = if sse { "/sse" } else { "/ws" };
    let mut query = match &common.jwt_secret {
        Some(s) => format!("{path}?token={}", mint_token(s, &name)?),
        None => format!("{path}?user={name}"),
    };
    // WebSockets resume with since/epoch; SSE the way a browser does, with Last-Event-ID.
    let last_event_id = resume.filter(|_| sse).map(|(since, epoch)| format!("{epoch}:{since}"));
    if let Some((since, epoch)) = resume.filter(|_| !sse) {
        query.push_str(&format!("&since={since}&epoch={epoch}"));
    }
    let host = target.trim_start_matches("ws://");
    let addr: SocketAddr =
        tokio::net::lookup_host(host).await?.next().ok_or_else(|| anyhow!("cannot resolve {host}"))?;
    let socket = tokio::net::TcpSocket::new_v4()?;
    if common.source_ips > 1 {
        let ip = Ipv4Addr::new(127, 0, 0, 1 + (index % common.source_ips as usize) as u8);
        socket.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
    }
    let stream = socket.connect(addr).await?;
    let _ = stream.set_nodelay(true);
    if common.peer == Peer::Nats {
        let conn = switchyard_load::nats::NatsConn::open(stream, target, &name).await?;
        return Ok((Conn::Nats(Box::new(conn)), json!({"type": "welcome", "seq": 0, "epoch": ""})));
    }
    let mut conn = if sse {
        Conn::Sse(SseConn::open(stream, &query, last_event_id.as_deref()).await?)
    } else {
        Conn::Ws(Box::new(WsClient::connect(stream, &format!("{target}{query}")).await?))
    };
    let welcome = match tokio::time::timeout(Duration::from_secs(10), conn.next_text()).await {
        Ok(Some(t)) => serde_json::from_str::<Value>(&t)?,
        Ok(None) => bail!("closed before welcome"),
        Err(_) => bail!("no welcome within 10s"),
    };
    if welcome["type"] != "welcome" {
        bail!("first frame was not welcome: {welcome}");
    }
    Ok((conn, welcome))
}

/// One logical client connection: reads, checks, records latency, churns.
pub(crate) async fn client_task(
    run: Arc<Run>,
    user: usize,
    index: usize,
    slow: bool,
    mut ws: Conn,
    welcome: Value,
) -> ConnCheck {
    let name = user_name(user);
    let mut epoch = welcome["epoch"].as_str().unwrap_or_default().to_string();
    let mut check = ConnCheck::after(welcome["seq"].as_u64().unwrap_or(0));
    let mut lat = Vec::with_capacity(256);
    let conns = (run.common.users * run.common.conns_per_user) as f64;
    let churn_mean = if run.common.churn > 0.0 { Some(conns / run.common.churn) } else { None };
    let next_churn = |rng: &mut fastrand::Rng| {
        churn_mean.map(|m| Instant::now() + Duration::from_secs_f64(-m * (1.0 - rng.f64()).ln()))
    };
    let mut rng = fastrand::Rng::with_seed(index as u64);
    let mut churn_at = next_churn(&mut rng);
    let mut stopped = run.stopped.subscribe();
    // Reconnects go to the next node each time (one node: the same one).
    let mut hops = 0;
    let mut next_target = || {
        hops += 1;
        run.targets[(index + hops) % run.targets.len()].clone()
    };
    loop {
        if run.stop.load(Ordering::Relaxed) {
            break;
        }
        let churn_sleep = async {
            match churn_at {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stopped.changed() => break,
            msg = ws.next_text() => match msg {
                Some(t) => {
                    // One clock read for this frame and those already read
                    // behind it (up to BURST, taken without waiting): they
                    // were all here when the clock was read.
                    let now_us = run.start.elapsed().as_micros() as u64;
                    let mut next = Some(t);
                    let mut n = 0;
                    while let Some(t) = next.take() {
                        received(&run, &t, &name, now_us, &mut check, &mut lat);
                        n += 1;
                        if n < BURST {
                            next = ws.next_text().now_or_never().flatten();
                        }
                    }
                    if slow {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                None => {
                    // Dropped by the broker (e.g. 1013 for a slow reader): resume.
                    let target = next_target();
                    if !reconnect(&run, &target, user, index, &mut ws, &mut epoch, &mut check).await { break }
                }
            },
            _ = churn_sleep => {
                ws.close().await;
                let target = next_target();
                if !reconnect(&run, &target, user, index, &mut ws, &mut epoch, &mut check).await { break }
                churn_at = next_churn(&mut rng);
            }
        }
    }
    let _ = run.latency_tx.send(lat);
    ws.close().await;
    check
}

/// Frames a client takes in one go after waking (see the receive loop).
const BURST: usize = 16;

/// Checks one received frame and records its latency (`now_us`: when it was
/// in hand, on the run's clock).
fn received(run: &Run, t: &str, name: &str, now_us: u64, check: &mut ConnCheck, lat: &mut Vec<u64>) {
    let Some(ev) = Seen::read(t) else { return };
    let d = ev.data;
    let lane = match ev.priority {
        "high" => 0,
        "low" => 2,
        _ => 1,
    };
    let (own, lane) = if d.u == EVERYONE {
        (EVERYONE, lane + 3 * broadcast_source(d.n, run.common.publishers))
    } else {
        (name, lane)
    };
    check.observe(own, d.u, ev.seq, d.n, lane);
    run.received.fetch_add(1, Ordering::Relaxed);
    if d.t >= run.measure_from_us.load(Ordering::Relaxed) {
        lat.push(now_us.saturating_sub(d.t));
    }
    if lat.len() == 256 {
        let _ = run.latency_tx.send(std::mem::replace(lat, Vec::with_capacity(256)));
    }
}

pub(crate) async fn reconnect(
    run: &Run,
    target: &str,
    user: usize,
    index: usize,
    ws: &mut Conn,
    epoch: &mut String,
    check: &mut ConnCheck,
) -> bool {
    match connect_retrying(target, &run.common, user, index, Some((check.resume_point(), epoch)), 50).await {
        Ok((new_ws, welcome)) => {
            run.resumes.fetch_add(1, Ordering::Relaxed);
            if welcome["recovered"] != true {
                run.resume_failed.fetch_add(1, Ordering::Relaxed);
            }
            *epoch = welcome["epoch"].as_str().unwrap_or_default().to_string();
            *ws = new_ws;
            check.resumed();
            true
        }
        Err(_) => {
            run.resume_failed.fetch_add(1, Ordering::Relaxed);
            false
        }
    }
}

/// [`connect`], tried up to `attempts` times (each bounded to 10 s, 20 ms
/// apart); the last error if none succeeds.
pub(crate) async fn connect_retrying(
    target: &str,
    common: &Common,
    user: usize,
    index: usize,
    resume: Option<(u64, &str)>,
    attempts: usize,
) -> anyhow::Result<(Conn, Value)> {
    let mut last = anyhow!("no connection attempt");
    for _ in 0..attempts.max(1) {
        match tokio::time::timeout(Duration::from_secs(10), connect(target, common, user, index, resume))
            .await
        {
            Ok(Ok(c)) => return Ok(c),
            Ok(Err(e)) => last = e,
            Err(_) => last = anyhow!("no connection within 10 s"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err(last)
}

/// What the checker takes from an event frame.
#[derive(Debug, PartialEq)]
struct Seen<'a> {
    seq: u64,
    priority: &'a str,
    data: EventData<'a>,
}

impl<'a> Seen<'a> {
    /// The checked fields of an event frame; `None` for any other frame.
    fn read(t: &'a str) -> Option<Self> {
        Self::read_fast(t).or_else(|| Self::read_json(t))
    }

    /// Reads an event frame as the broker writes the generator's events —
    /// `{"type":"event","seq":S,"event":"E","data":{"u":"U","n":N,"t":T,"p":"…"},"priority":"P","ts":M}`,
    /// members in any order (the NATS payload's order and its `user` too),
    /// no whitespace, strings without escapes — in one pass with no
    /// allocation. `None` for anything else, which [`Self::read_json`] then
    /// decides. serde_json was the generator's largest cost per delivery,
    /// and at 100 users the generator was the bottleneck.
    fn read_fast(t: &'a str) -> Option<Self> {
        let mut rest = t.strip_prefix('{')?;
        let (mut ty, mut seq, mut priority, mut data) = (None, None, None, None);
        loop {
            let (key, after) = plain_string(rest.strip_prefix('"')?)?;
            rest = after.strip_prefix(':')?;
            rest = match key {
                "seq" | "ts" => {
                    let (n, after) = number(rest)?;
                    if key == "seq" {
                        seq = Some(n);
                    }
                    after
                }
                "type" | "event" | "priority" | "user" => {
                    let (text, after) = plain_string(rest.strip_prefix('"')?)?;
                    match key {
                        "type" => ty = Some(text),
                        "priority" => priority = Some(text),
                        _ => {}
                    }
                    after
                }
                "data" => {
                    let (d, after) = Self::data(rest)?;
                    data = Some(d);
                    after
                }
                _ => return None,
            };
            match rest.as_bytes().first()? {
                b',' => rest = &rest[1..],
                b'}' if rest.len() == 1 => break,
                _ => return None,
            }
        }
        (ty? == "event").then_some(())?;
        Some(Seen { seq: seq?, priority: priority.unwrap_or_default(), data: data? })
    }

    /// The generator's data object, `{"u":"U","n":N,"t":T}` with an optional
    /// `"p":"…"` padding last, and what follows it.
    fn data(s: &'a str) -> Option<(EventData<'a>, &'a str)> {
        let (u, rest) = plain_string(s.strip_prefix(r#"{"u":""#)?)?;
        let (n, rest) = number(rest.strip_prefix(r#","n":"#)?)?;
        let (t, mut rest) = number(rest.strip_prefix(r#","t":"#)?)?;
        if let Some(padded) = rest.strip_prefix(r#","p":""#) {
            rest = plain_string(padded)?.1;
        }
        Some((EventData { u, n, t }, rest.strip_prefix('}')?))
    }

    /// Any frame, through serde_json.
    fn read_json(t: &'a str) -> Option<Self> {
        let ev = serde_json::from_str::<EventFrame<'_>>(t).ok()?;
        if ev.ty != "event" {
            return None;
        }
        Some(Seen { seq: ev.seq, priority: ev.priority, data: ev.data? })
    }
}

/// Leading decimal digits as a `u64`, and what follows them; `None` for
/// no digit or a value past `u64::MAX` (as `str::parse` decides), in one pass.
fn number(s: &str) -> Option<(u64, &str)> {
    let mut n: u64 = 0;
    let mut end = 0;
    for &b in s.as_bytes() {
        if !b.is_ascii_digit() {
            break;
        }
        n = n.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        end += 1;
    }
    (end > 0).then(|| (n, &s[end..]))
}

/// A string's text up to its closing quote (and what follows the quote),
/// if it has no escape and no control character.
///
/// One pass, sixteen bytes at a time (the broker's own vector test), over
/// the 150-odd bytes of padding every event carries (a `memchr2` for the
/// end and then a byte loop for control characters was 8% of the
/// generator's CPU at 100 users, max rate; a 32-byte compare against a run
/// of `x` before the vector test, 15%).
fn plain_string(s: &str) -> Option<(&str, &str)> {
    let b = s.as_bytes();
    let i = switchyard::jsonscan::plain_prefix(b);
    let end = i + b[i..].iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20)?;
    (b[end] == b'"').then(|| (&s[..end], &s[end + 1..]))
}

/// The fields of an event frame the checker needs (borrowed, no allocation).
#[derive(serde::Deserialize)]
pub(crate) struct EventFrame<'a> {
    #[serde(rename = "type", borrow)]
    pub(crate) ty: &'a str,
    #[serde(default)]
    pub(crate) seq: u64,
    #[serde(default, borrow)]
    pub(crate) priority: &'a str,
    #[serde(default, borrow)]
    pub(crate) data: Option<EventData<'a>>,
}

#[derive(serde::Deserialize, Debug, PartialEq)]
pub(crate) struct EventData<'a> {
    #[serde(borrow)]
    pub(crate) u: &'a str,
    pub(crate) n: u64,
    pub(crate) t: u64,
}

#[cfg(test)]
mod tests {
    use super::{plain_string, Seen};

    /// Every stop (quote, backslash, control character) at every offset
    /// around the eight-byte steps is found where the byte loop finds it.
    #[test]
    fn plain_strings_and_numbers_end_where_a_byte_loop_ends() {
        for len in 0..40 {
            for stop in ['"', '\\', '\u{1}', '\u{1f}', '\n'] {
                for tail in ["", "x\"", "é\""] {
                    let s =
                        format!("{}{stop}{tail}", "ab€".repeat(len).chars().take(len).collect::<String>());
                    let text = s.split(stop).next().unwrap_or_default();
                    let want = (stop == '"').then(|| (text, &s[text.len() + 1..]));
                    assert_eq!(plain_string(&s), want, "{s:?}");
                }
            }
            let open = "y".repeat(len);
            assert_eq!(plain_string(&open), None, "unterminated {len}");
            for stop in ['"', '\u{1}'] {
                let padded = format!("{}{stop}", "x".repeat(len + 30));
                let want = (stop == '"').then(|| (&padded[..len + 30], ""));
                assert_eq!(plain_string(&padded), want, "{padded:?}");
            }
        }
        for digits in ["0", "7x", "18446744073709551615", "18446744073709551616", "", "x1", "00012,"] {
            let want = {
                let end = digits.bytes().position(|b| !b.is_ascii_digit()).unwrap_or(digits.len());
                digits[..end].parse::<u64>().ok().map(|n| (n, &digits[end..]))
            };
            assert_eq!(super::number(digits), want, "{digits:?}");
        }
    }

    /// The shortcut reads what serde_json reads, and leaves to it every
    /// frame it is not sure of.
    #[test]
    fn the_fast_read_agrees_with_serde() {
        let pad = "x".repeat(200);
        let frames = [
            format!(r#"{{"type":"event","seq":42,"event":"load","data":{{"u":"load-7","n":9,"t":123456,"p":"{pad}"}},"priority":"high","ts":1700000000000}}"#),
            r#"{"type":"event","seq":1,"event":"load","data":{"u":"*","n":18446744073709551615,"t":0},"priority":"low","ts":5}"#.to_string(),
            format!(r#"{{"type":"event","seq":7,"user":"load-3","event":"load","priority":"normal","data":{{"u":"load-3","n":1,"t":2,"p":"{pad}"}}}}"#),
            // Escapes, another field order, other frames: serde decides.
            r#"{"type":"event","seq":3,"event":"load","data":{"u":"lo\u0061d-1","n":1,"t":2},"priority":"normal","ts":5}"#.to_string(),
            r#"{"type":"event","seq":3,"event":"load","data":{"n":1,"u":"load-1","t":2},"priority":"normal","ts":5}"#.to_string(),
            r#"{"type":"event","seq":3,"event":"load","data":{"u":"load-1","n":1,"t":2,"p":"},\"priority\":\"high"},"priority":"normal","ts":5}"#.to_string(),
            r#"{"type":"welcome","seq":0,"epoch":"e"}"#.to_string(),
            r#"{"type":"event","seq":3,"event":"load","data":{"u":"a","n":1,"t":2,"p":"x"},"priority":"normal","ts":5,"x":1}"#.to_string(),
            r#"{"type":"event","seq":3,"event":"load","data":{"u":"a","n":1,"t":2,"p":"x","q":1},"priority":"normal","ts":5}"#.to_string(),
            r#"{"type":"event","seq":-1,"event":"load","data":{"u":"a","n":1,"t":2},"priority":"normal","ts":5}"#.to_string(),
            r#"{"type":"event","seq":2,"event":"load","data":{"u":"a","n":1,"t":2},"priority":"normal","ts":5} "#.to_string(),
            r#"{"type":"event","seq":2,"event":"load","data":{"u":"a","n":1,"t":2},"priority":"normal","ts":5}}"#.to_string(),
            r#"{"type":"event","seq":2,"data":{"u":"a","n":1,"t":2}"#.to_string(),
            r#"{"type":"other","seq":2,"data":{"u":"a","n":1,"t":2}}"#.to_string(),
        ];
        let mut fast = 0;
        for f in &frames {
            if let Some(seen) = Seen::read_fast(f) {
                fast += 1;
                assert_eq!(Some(&seen), Seen::read_json(f).as_ref(), "{f}");
            }
            assert_eq!(Seen::read(f), Seen::read_json(f), "{f}");
        }
        assert_eq!(fast, 3, "the broker's and the NATS payload's shapes take the shortcut");
    }
}
