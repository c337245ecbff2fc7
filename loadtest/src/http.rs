//! Small HTTP/1.1 GETs against the broker's API (stats, histograms).

use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use serde_json::Value;
use tokio::net::TcpStream;

/// The nodes' total shed count, from their /v1/stats (nats-server: none).
pub(crate) async fn broker_shed(apis: &[String], key: Option<&str>) -> anyhow::Result<u64> {
    let mut total = 0;
    for api in apis.iter().filter(|a| !a.starts_with("nats://")) {
        let v = http_get_json(api, "/v1/stats", key).await?;
        total += v["events"]["shed"].as_u64().unwrap_or(0);
    }
    Ok(total)
}

/// A minimal HTTP/1.1 GET (the API listener is plain HTTP on loopback).
pub(crate) async fn http_get_json(api: &str, path: &str, key: Option<&str>) -> anyhow::Result<Value> {
    let body = http_get_text(api, path, key).await?;
    serde_json::from_str(&body).with_context(|| format!("GET {path}: {body}"))
}

/// One `GET` on the API listener (HTTP/1.1, connection closed); the body.
pub(crate) async fn http_get_text(api: &str, path: &str, key: Option<&str>) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let host = api.trim_start_matches("http://");
    let mut s = TcpStream::connect(host).await.with_context(|| format!("connecting to {host}"))?;
    let auth = key.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(|| anyhow!("bad HTTP response"))?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.to_string())
}
