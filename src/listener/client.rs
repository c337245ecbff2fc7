//! The client listener: accepts sockets, reads and checks the upgrade request,
//! authenticates it, and hands the socket to the user's shard.
//!
//! Runs on the I/O runtime (not on a shard). It reads only the request head
//! (bounded in size by [`MAX_HEAD`] and in time by `--handshake-timeout`),
//! answers every refusal with an HTTP status and a JSON body, and never
//! writes to a socket it has handed over: the owning shard writes the `101`
//! response together with the `welcome` frame.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use sha1::{Digest, Sha1};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, Credentials};
use crate::connection::transport::{HandedSocket, Socket, TlsStream};
use crate::listener::reply::{respond, write_response, Refusal};
use crate::shard::{AttachCmd, Command, Peer, Resume};
use crate::shared::Shared;

/// Largest request head accepted; larger gets 431.
pub const MAX_HEAD: usize = 8192;
const MAX_HEADERS: usize = 32;
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// What a parsed request asks for.
#[derive(Debug)]
pub enum Parsed {
    Health,
    /// `GET /readyz`: 200 while this node can serve (in cluster mode:
    /// while Redis is reachable), else 503.
    Ready,
    Upgrade(UpgradeRequest),
    /// `GET /sse`: the same stream as Server-Sent Events (no upgrade;
    /// `accept_key` is empty).
    Sse(UpgradeRequest),
    /// An upgrade to `--echo-path` (conformance aid; query ignored).
    Echo(UpgradeRequest),
}

/// A checked WebSocket upgrade request, not yet authenticated.
#[derive(Debug)]
pub struct UpgradeRequest {
    pub accept_key: String,
    /// The `Origin` header, lower-cased, if any.
    pub origin: Option<String>,
    pub query_user: Option<String>,
    pub query_token: Option<String>,
    pub bearer: Option<String>,
    pub since: Option<u64>,
    pub epoch: Option<String>,
}

/// A stream the listener reads a request head from, answers on, and hands
/// to a shard: plain TCP, or a TLS session.
trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send + Sized {
    /// Prepares the stream to cross to a shard's thread.
    fn into_handed(self) -> std::io::Result<HandedSocket>;
    /// Takes back a stream the shard could not accept, to answer on it.
    fn from_handed(h: HandedSocket) -> Option<Self>;
}

impl ClientStream for TcpStream {
    fn into_handed(self) -> std::io::Result<HandedSocket> {
        Ok(HandedSocket::Plain(self.into_std()?))
    }

    fn from_handed(h: HandedSocket) -> Option<Self> {
        match h {
            HandedSocket::Plain(s) => TcpStream::from_std(s).ok(),
            HandedSocket::Tls(_) => None,
        }
    }
}

impl ClientStream for TlsStream {
    fn into_handed(mut self) -> std::io::Result<HandedSocket> {
        self.get_mut().0.detach()?;
        Ok(HandedSocket::Tls(Box::new(self)))
    }

    fn from_handed(h: HandedSocket) -> Option<Self> {
        match h {
            HandedSocket::Tls(mut tls) => tls.get_mut().0.attach().ok().map(|()| *tls),
            HandedSocket::Plain(_) => None,
        }
    }
}

/// Accepts client sockets until `shutdown` fires; with `tls`, every socket
/// must complete a TLS handshake first.
///
/// At most `--max-pending-handshakes` sockets may be between accept and
/// hand-over at once (each also bounded by `--handshake-timeout`, which
/// covers the TLS handshake too), so a flood of idle or slow connections
/// cannot pile up; the excess gets 503 at once (plain) or is dropped (TLS:
/// there is no session to answer in).
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
) {
    let pending = Arc::new(tokio::sync::Semaphore::new(shared.config.max_pending_handshakes));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((mut stream, _)) => match pending.clone().try_acquire_owned() {
                Ok(permit) => {
                    set_user_timeout(&stream, shared.config.idle_timeout);
                    let shared = shared.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let deadline = tokio::time::Instant::now() + shared.config.handshake_timeout;
                        match tls {
                            None => handle(stream, &shared, deadline).await,
                            Some(acceptor) => {
                                let session = acceptor.accept(Socket::Live(stream));
                                if let Ok(Ok(s)) = tokio::time::timeout_at(deadline, session).await {
                                    handle(s, &shared, deadline).await;
                                }
                            }
                        }
                        drop(permit);
                    });
                }
                Err(_) if tls.is_some() => drop(stream),
                Err(_) => {
                    tokio::spawn(async move {
                        let r = Refusal::new(
                            503,
                            "too_many_handshakes",
                            "too many connections are still handshaking",
                        );
                        let _ = tokio::time::timeout(Duration::from_secs(1), respond(&mut stream, &r)).await;
                    });
                }
            },
            Err(e) => {
                // Usually EMFILE/ENFILE: back off instead of spinning.
                tracing::warn!(error = %e, "client accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Has the kernel abort the connection when data it sent stays
/// unacknowledged for `after` (`TCP_USER_TIMEOUT`): a peer whose network
/// vanished without a FIN is then found by the writes (pings, events) even
/// where no idle timeout applies (an SSE client cannot send anything).
fn set_user_timeout(stream: &TcpStream, after: Duration) {
    use std::os::fd::AsRawFd;
    let ms: libc::c_uint = after.as_millis().min(u32::MAX as u128) as libc::c_uint;
    // SAFETY: setsockopt on a socket this function borrows; the value is a
    // local c_uint whose size is passed with it.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if r != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "could not set TCP_USER_TIMEOUT");
    }
}

async fn handle<S: ClientStream>(mut stream: S, shared: &Shared, deadline: tokio::time::Instant) {
    let (head, leftover) = match tokio::time::timeout_at(deadline, read_head(&mut stream)).await {
        Ok(Ok(v)) => v,
        Ok(Err(refusal)) => return respond(&mut stream, &refusal).await,
        Err(_) => {
            let r = Refusal::new(408, "handshake_timeout", "the upgrade request took too long");
            return respond(&mut stream, &r).await;
        }
    };
    let attach = match parse_request(&head, shared.config.echo_path.as_deref()) {
        Ok(Parsed::Health) => {
            let body = br#"{"status":"ok"}"#;
            let _ = write_response(&mut stream, 200, "OK", &[], body).await;
            return;
        }
        Ok(Parsed::Ready) => {
            if shared.cluster.as_ref().is_some_and(|e| !e.health.is_ready()) {
                let r = Refusal::new(503, "engine_unavailable", "the cluster engine (Redis) is unreachable");
                respond(&mut stream, &r).await;
            } else {
                let _ = write_response(&mut stream, 200, "OK", &[], br#"{"status":"ready"}"#).await;
            }
            return;
        }
        Ok(Parsed::Upgrade(up)) => admit(shared, up, false),
        Ok(Parsed::Sse(up)) => admit(shared, up, true),
        Ok(Parsed::Echo(up)) => admit_echo(shared, up),
        Err(r) => Err(r),
    };
    let refusal = match attach {
        Ok((shard, peer, response)) => match hand_over(stream, shared, shard, peer, response, leftover) {
            Ok(()) => return,
            Err(None) => return, // the socket is unusable; nothing to answer on
            Err(Some((s, r))) => {
                stream = s;
                r
            }
        },
        Err(r) => r,
    };
    respond(&mut stream, &refusal).await;
}

/// Reads until the end of the request head. Returns the head and any bytes after it.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> Result<(Vec<u8>, Bytes), Refusal> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|_| Refusal::new(400, "bad_request", "connection error"))?;
        if n == 0 {
            return Err(Refusal::new(
                400,
                "bad_request",
                "connection closed before the request was complete",
            ));
        }
        let scan_from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = find_head_end(&buf[scan_from..]) {
            let end = scan_from + pos;
            if end > MAX_HEAD {
                return Err(Refusal::new(431, "header_too_large", "request head over 8 KiB"));
            }
            let leftover = Bytes::copy_from_slice(&buf[end..]);
            buf.truncate(end);
            return Ok((buf, leftover));
        }
        if buf.len() > MAX_HEAD {
            return Err(Refusal::new(431, "header_too_large", "request head over 8 KiB"));
        }
    }
}

fn find_head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Parses and checks a request head (pure: fuzzable and unit-tested).
/// `echo_path` is `--echo-path`, if set.
pub fn parse_request(head: &[u8], echo_path: Option<&str>) -> Result<Parsed, Refusal> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(Refusal::new(400, "bad_request", "incomplete request")),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(431, "header_too_large", "too many headers"))
        }
        Err(e) => return Err(Refusal::new(400, "bad_request", format!("malformed request: {e}"))),
    }
    let method = req.method.unwrap_or("");
    let target = req.path.unwrap_or("");
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let echo = echo_path == Some(path);
    let sse = path == "/sse";
    match path {
        "/healthz" if method == "GET" => return Ok(Parsed::Health),
        "/readyz" if method == "GET" => return Ok(Parsed::Ready),
        "/ws" | "/sse" if method == "GET" => {}
        _ if echo && method == "GET" => {}
        _ if echo => return Err(Refusal::new(405, "method_not_allowed", "use GET")),
        "/ws" | "/sse" | "/healthz" | "/readyz" => {
            return Err(Refusal::new(405, "method_not_allowed", "use GET"))
        }
        _ => {
            return Err(Refusal::new(
                404,
                "not_found",
                "this listener serves GET /ws, GET /sse, GET /healthz and GET /readyz",
            ))
        }
    }
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
            .map(str::trim)
    };
    let has_token = |name: &str, token: &str| {
        header(name).is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    };
    let key = if sse {
        ""
    } else {
        if !has_token("upgrade", "websocket") || !has_token("connection", "upgrade") {
            return Err(Refusal::new(426, "upgrade_required", "this path needs a WebSocket upgrade"));
        }
        if header("sec-websocket-version") != Some("13") {
            return Err(Refusal::new(426, "upgrade_required", "Sec-WebSocket-Version must be 13"));
        }
        header("sec-websocket-key")
            .filter(|k| !k.is_empty())
            .ok_or_else(|| Refusal::new(400, "bad_request", "Sec-WebSocket-Key is missing"))?
    };
    let bearer = header("authorization").and_then(|v| {
        let (scheme, token) = v.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_string())
    });
    let mut up = UpgradeRequest {
        accept_key: if sse { String::new() } else { accept_key(key) },
        origin: header("origin").map(|o| o.trim_end_matches('/').to_ascii_lowercase()),
        query_user: None,
        query_token: None,
        bearer,
        since: None,
        epoch: None,
    };
    if echo {
        return Ok(Parsed::Echo(up));
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let v =
            percent_decode(v).ok_or_else(|| Refusal::new(400, "bad_request", "malformed query string"))?;
        match k {
            "user" => up.query_user = Some(v),
            "token" => up.query_token = Some(v),
            "epoch" => up.epoch = Some(v),
            "since" => {
                up.since =
                    Some(v.parse().map_err(|_| {
                        Refusal::new(400, "bad_request", "since must be a non-negative integer")
                    })?)
            }
            _ => {}
        }
    }
    if !sse {
        return Ok(Parsed::Upgrade(up));
    }
    // A browser reconnecting an EventSource sends the last id it saw; it is
    // fresher than the query the stream was first opened with.
    if let Some(raw) = header("last-event-id").filter(|v| !v.is_empty()) {
        let (epoch, seq) = crate::sse::parse_last_event_id(raw)
            .ok_or_else(|| Refusal::new(400, "bad_request", "Last-Event-ID must be <epoch>:<seq>"))?;
        up.epoch = Some(epoch);
        up.since = Some(seq);
    }
    Ok(Parsed::Sse(up))
}

fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// Decodes `%XX` escapes and `+`; `None` on a malformed escape or non-UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                out.push(v);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// Whether a browser `Origin` may open a socket (no header: not a browser).
pub fn origin_allowed(allowed: &[String], origin: Option<&str>) -> bool {
    match origin {
        None => true,
        Some(_) if allowed.is_empty() => true,
        Some(o) => allowed.iter().any(|a| a == o),
    }
}

/// Where an admitted upgrade goes: shard index, peer, `101` response.
type Admitted = (usize, Peer, Bytes);

/// Checks origin and credentials and takes a connection slot; `sse` for a
/// `GET /sse` stream (answered `200 text/event-stream` instead of `101`).
fn admit(shared: &Shared, up: UpgradeRequest, sse: bool) -> Result<Admitted, Refusal> {
    check_origin(shared, &up)?;
    let creds = Credentials {
        query_user: up.query_user.as_deref(),
        query_token: up.query_token.as_deref(),
        bearer: up.bearer.as_deref(),
    };
    let user = match shared.auth.authenticate(&creds) {
        Ok(u) => u,
        Err(AuthError::Unauthorized(m)) => return Err(Refusal::new(401, "unauthorized", m)),
        Err(e @ AuthError::BadUser) => return Err(Refusal::new(400, "invalid_user", e.to_string())),
    };
    if shared.cluster.as_ref().is_some_and(|e| !e.health.is_ready()) {
        return Err(Refusal::new(
            503,
            "engine_unavailable",
            "the cluster engine (Redis) is unreachable; retry",
        ));
    }
    take_slot(shared)?;
    let shard = shared.router.shard_for(&user);
    let resume = up.since.map(|since| Resume { since, epoch: up.epoch });
    let response =
        if sse { crate::sse::head(up.origin.as_deref()) } else { switching_protocols(&up.accept_key) };
    Ok((shard, Peer::User { user, resume, sse }, response))
}

/// Admits an `--echo-path` connection: origin checked, no credentials.
fn admit_echo(shared: &Shared, up: UpgradeRequest) -> Result<Admitted, Refusal> {
    check_origin(shared, &up)?;
    take_slot(shared)?;
    let shard = fastrand::usize(..shared.shards.len());
    Ok((shard, Peer::Echo, switching_protocols(&up.accept_key)))
}

fn check_origin(shared: &Shared, up: &UpgradeRequest) -> Result<(), Refusal> {
    if origin_allowed(&shared.config.allowed_origins, up.origin.as_deref()) {
        Ok(())
    } else {
        Err(Refusal::new(403, "forbidden_origin", "this Origin may not open a socket"))
    }
}

fn take_slot(shared: &Shared) -> Result<(), Refusal> {
    if shared.try_acquire_connection() {
        Ok(())
    } else {
        Err(Refusal::new(503, "too_many_connections", "the broker is at --max-connections"))
    }
}

fn switching_protocols(accept_key: &str) -> Bytes {
    Bytes::from(format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key}\r\n\r\n"
    ))
}

/// Pushes an admitted socket into its shard's ring, releasing the slot on
/// failure. A full ring gives the stream back with a 503 to answer.
fn hand_over<S: ClientStream>(
    stream: S,
    shared: &Shared,
    shard: usize,
    peer: Peer,
    response: Bytes,
    leftover: Bytes,
) -> Result<(), Option<(S, Refusal)>> {
    let Ok(socket) = stream.into_handed() else {
        shared.release_connection();
        return Err(None);
    };
    let cmd = Command::Attach(Box::new(AttachCmd { peer, socket, response, leftover }));
    match shared.shards[shard].push(cmd) {
        Ok(()) => Ok(()),
        Err((_, cmd)) => {
            shared.release_connection();
            let Command::Attach(a) = cmd else { return Err(None) };
            let stream = S::from_handed(a.socket).ok_or(None)?;
            Err(Some((stream, Refusal::new(503, "overloaded", "shard is busy; retry shortly"))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade(target: &str, extra: &str) -> Vec<u8> {
        format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n{extra}\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn accept_key_matches_rfc_example() {
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn parses_upgrade_with_query() {
        let Parsed::Upgrade(u) =
            parse_request(&upgrade("/ws?user=a%40b&since=5&epoch=e1", ""), None).unwrap()
        else {
            panic!("expected upgrade")
        };
        assert_eq!(u.query_user.as_deref(), Some("a@b"));
        assert_eq!(u.since, Some(5));
        assert_eq!(u.epoch.as_deref(), Some("e1"));
    }

    #[test]
    fn bearer_header_is_read() {
        let Parsed::Upgrade(u) =
            parse_request(&upgrade("/ws", "Authorization: Bearer abc.def\r\n"), None).unwrap()
        else {
            panic!("expected upgrade")
        };
        assert_eq!(u.bearer.as_deref(), Some("abc.def"));
    }

    #[test]
    fn origins() {
        let allowed = vec!["https://app.example".to_string()];
        assert!(origin_allowed(&allowed, None));
        assert!(origin_allowed(&allowed, Some("https://app.example")));
        assert!(!origin_allowed(&allowed, Some("https://evil.example")));
        assert!(origin_allowed(&[], Some("https://anything")));
        let Parsed::Upgrade(u) =
            parse_request(&upgrade("/ws", "Origin: https://App.Example/\r\n"), None).unwrap()
        else {
            panic!("expected upgrade")
        };
        assert_eq!(u.origin.as_deref(), Some("https://app.example"));
    }

    #[test]
    fn refusals() {
        assert_eq!(parse_request(b"GET /nope HTTP/1.1\r\n\r\n", None).unwrap_err().status, 404);
        assert_eq!(parse_request(b"POST /ws HTTP/1.1\r\n\r\n", None).unwrap_err().status, 405);
        assert_eq!(parse_request(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", None).unwrap_err().status, 426);
        assert_eq!(parse_request(b"\x00\x01garbage\r\n\r\n", None).unwrap_err().status, 400);
        assert_eq!(parse_request(&upgrade("/ws?since=-1", ""), None).unwrap_err().status, 400);
        assert!(matches!(parse_request(b"GET /healthz HTTP/1.1\r\n\r\n", None), Ok(Parsed::Health)));
    }

    #[test]
    fn echo_path_only_when_configured() {
        assert_eq!(parse_request(&upgrade("/echo", ""), None).unwrap_err().status, 404);
        assert!(matches!(parse_request(&upgrade("/echo?x=1", ""), Some("/echo")), Ok(Parsed::Echo(_))));
        assert!(matches!(parse_request(&upgrade("/ws", ""), Some("/echo")), Ok(Parsed::Upgrade(_))));
        let post = b"POST /echo HTTP/1.1\r\n\r\n";
        assert_eq!(parse_request(post, Some("/echo")).unwrap_err().status, 405);
        let plain = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n";
        assert_eq!(parse_request(plain, Some("/echo")).unwrap_err().status, 426);
    }
}
