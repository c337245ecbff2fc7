//! TLS on the client listener (`--tls-cert` / `--tls-key`), with a
//! certificate generated here: wss:// clients get the same protocol, a
//! backlog arrives whole and in order, plain-text, failed and silent
//! handshakes are dropped while TLS clients keep being served, and unusable
//! files are a start-up error naming the flag.

use std::sync::Arc;

use serde_json::json;
use switchyard::config::TlsFiles;
use tokio::net::TcpStream;
use tokio_rustls::rustls::{self, pki_types::ServerName, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::WebSocketStream;

use crate::util::*;

type Wss = WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

/// A self-signed certificate for `localhost`, written as PEM files.
struct TestCert {
    dir: tempfile::TempDir,
    cert: rustls::pki_types::CertificateDer<'static>,
}

impl TestCert {
    fn new() -> Self {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("certificate");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("cert.pem"), ck.cert.pem()).expect("write cert");
        std::fs::write(dir.path().join("key.pem"), ck.signing_key.serialize_pem()).expect("write key");
        TestCert { dir, cert: ck.cert.der().clone() }
    }

    fn files(&self) -> TlsFiles {
        TlsFiles { cert: self.dir.path().join("cert.pem"), key: self.dir.path().join("key.pem"), flag: "tls" }
    }

    fn connector(&self) -> TlsConnector {
        let mut roots = RootCertStore::empty();
        roots.add(self.cert.clone()).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        TlsConnector::from(Arc::new(config))
    }
}

/// A TLS session with `addr` that trusts `cert` for `localhost`.
async fn tls_connect(
    addr: std::net::SocketAddr,
    cert: &TestCert,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    tokio::time::timeout(WAIT, cert.connector().connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake")
}

async fn connect_wss(b: &TestBroker, cert: &TestCert, user: &str) -> Wss {
    let tls = tls_connect(b.client, cert).await;
    let url = format!("wss://localhost/ws?user={user}");
    let (ws, _) = tokio::time::timeout(WAIT, tokio_tungstenite::client_async(url, tls))
        .await
        .expect("upgrade in time")
        .expect("upgrade accepted");
    ws
}

#[tokio::test]
async fn wss_clients_get_welcome_and_every_event_in_order() {
    let cert = TestCert::new();
    let b = TestBroker::with(|c| c.tls = Some(cert.files()));
    let mut ws = connect_wss(&b, &cert, "alice").await;
    let welcome = next_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user"], "alice");
    // A backlog bigger than one write: everything arrives, in order.
    for i in 0..300 {
        b.publish("alice", "agent_thinking", json!({"i": i, "pad": "x".repeat(200)})).await;
    }
    let events = next_events(&mut ws, 300).await;
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e["seq"], i as u64 + 1);
        assert_eq!(e["data"]["i"], i as u64);
    }
}

#[tokio::test]
async fn plain_and_broken_handshakes_are_dropped_and_tls_clients_still_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = TestCert::new();
    let b = TestBroker::with(|c| c.tls = Some(cert.files()));
    // A plain-text upgrade on the TLS port: the handshake fails, the socket closes.
    let mut plain = TcpStream::connect(b.client).await.expect("connect");
    plain
        .write_all(b"GET /ws?user=bob HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    let read = tokio::time::timeout(WAIT, plain.read_to_end(&mut buf)).await.expect("closed in time");
    assert!(read.is_err() || !buf.starts_with(b"HTTP/1.1 101"), "no upgrade over plain text");
    // A client that does not trust the certificate gives up mid-handshake.
    let untrusting = TestCert::new();
    let tcp = TcpStream::connect(b.client).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("server name");
    assert!(untrusting.connector().connect(name, tcp).await.is_err());

    let mut ws = connect_wss(&b, &cert, "alice").await;
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
    b.publish("alice", "agent_started", json!({})).await;
    assert_eq!(next_events(&mut ws, 1).await[0]["event"], "agent_started");
}

/// The TLS handshake counts against --handshake-timeout and
/// --max-pending-handshakes: a client that connects and never says hello
/// holds its slot only until the timeout, and is then dropped.
#[tokio::test]
async fn silent_tls_clients_are_dropped_at_the_handshake_timeout() {
    use tokio::io::AsyncReadExt;
    let cert = TestCert::new();
    let b = TestBroker::with(|c| {
        c.tls = Some(cert.files());
        c.handshake_timeout = std::time::Duration::from_millis(300);
        c.max_pending_handshakes = 1;
    });
    let started = tokio::time::Instant::now();
    let mut silent = TcpStream::connect(b.client).await.expect("connect");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, silent.read(&mut buf)).await.expect("dropped in time");
    assert!(matches!(n, Ok(0) | Err(_)), "the silent client is closed, not answered");
    // A timeout cannot fire early: this shows the broker waited for it.
    assert!(started.elapsed() >= std::time::Duration::from_millis(300));
    // Its slot is free again: a real client gets through.
    let mut ws = connect_wss(&b, &cert, "alice").await;
    assert_eq!(next_json(&mut ws).await["type"], "welcome");
}

#[tokio::test]
async fn unusable_tls_files_are_a_start_error_naming_the_flag() {
    let cert = TestCert::new();
    let mut cfg = switchyard::Config::for_tests();
    let mut files = cert.files();
    files.cert = cert.dir.path().join("missing.pem");
    cfg.tls = Some(files);
    let err = switchyard::start(cfg).err().expect("refused");
    assert!(err.to_string().contains("--tls-cert"), "{err}");

    let mut cfg = switchyard::Config::for_tests();
    let mut files = cert.files();
    files.key = files.cert.clone(); // a certificate where the key should be
    cfg.tls = Some(files);
    let err = switchyard::start(cfg).err().expect("refused");
    assert!(err.to_string().contains("--tls-key"), "{err}");
}

#[tokio::test]
async fn api_over_tls_with_api_tls_flags() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = TestCert::new();
    let b = TestBroker::with(|c| {
        let mut files = cert.files();
        files.flag = "api-tls";
        c.api_tls = Some(files);
    });
    let (mut ws, _) = b.connect("apitls").await;
    let mut tls = tls_connect(b.api, &cert).await;
    let body = json!({"user": "apitls", "event": "over_tls"}).to_string();
    let req = format!(
        "POST /v1/publish HTTP/1.1\r\nHost: localhost\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(req.as_bytes()).await.expect("write");
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut resp)).await.expect("response in time");
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(next_events(&mut ws, 1).await[0]["event"], "over_tls");
    // A publisher stream over TLS, its first frame in the request's packet.
    let mut tls = tls_connect(b.api, &cert).await;
    let body = json!({"user": "apitls", "event": "streamed_over_tls"}).to_string();
    let got = stream_publish_raw(&mut tls, b.api_key.as_deref(), &body).await;
    assert!(got.contains("{\"seq\":2,\"delivered\":1}"), "{got}");
    assert_eq!(next_events(&mut ws, 1).await[0]["event"], "streamed_over_tls");
    // Plain HTTP on the TLS listener gets no answer, and breaks nothing.
    let mut plain = TcpStream::connect(b.api).await.expect("connect");
    plain.write_all(b"GET /v1/stats HTTP/1.1\r\nHost: x\r\n\r\n").await.expect("write");
    let mut junk = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut junk)).await.expect("closed in time");
    assert!(!String::from_utf8_lossy(&junk).contains("200 OK"));
    b.stop().await;
}

#[tokio::test]
async fn sse_streams_work_through_tls() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cert = TestCert::new();
    let b = TestBroker::with(|c| c.tls = Some(cert.files()));
    let mut tls = tls_connect(b.client, &cert).await;
    tls.write_all(b"GET /sse?user=ssetls HTTP/1.1\r\nHost: localhost\r\n\r\n").await.expect("write");
    let mut got = Vec::new();
    let mut published = false;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !String::from_utf8_lossy(&got).contains("event: over_tls") {
        let mut chunk = [0u8; 4096];
        let n =
            tokio::time::timeout_at(deadline, tls.read(&mut chunk)).await.expect("in time").expect("read");
        assert!(n > 0, "stream ended: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&chunk[..n]);
        if !published && String::from_utf8_lossy(&got).contains("event: welcome") {
            b.publish("ssetls", "over_tls", json!(1)).await;
            published = true;
        }
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\nContent-Type: text/event-stream"), "{text}");
    assert!(text.contains(":1\nevent: over_tls\ndata: {"), "{text}");
    b.stop().await;
}
