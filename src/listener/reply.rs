//! HTTP replies written straight to a socket, before (or instead of) any
//! protocol stack: the client listener's refusals and health answer, and the
//! API listener's refusal of connections over `--api-max-connections`.
//!
//! Owns the contract's error envelope, `{"error":{"code","message"}}`
//! ([`error_body`]), and the API's JSON responses built on it ([`error`],
//! [`json`]).

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Response, StatusCode};
use tokio::io::{AsyncWrite, AsyncWriteExt};

type Body = Full<Bytes>;

/// A refusal: status line, machine code, message.
#[derive(Debug)]
pub struct Refusal {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl Refusal {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> Self {
        Refusal { status, code, message: message.into() }
    }
}

/// The JSON error envelope of every HTTP error this broker sends.
pub fn error_body(code: &str, message: &str) -> String {
    serde_json::json!({"error": {"code": code, "message": message}}).to_string()
}

/// Writes `r` as a complete HTTP/1.1 response and shuts the write side down.
pub async fn respond<S: AsyncWrite + Unpin>(stream: &mut S, r: &Refusal) {
    let body = error_body(r.code, &r.message);
    let extra: &[(&str, &str)] = if r.status == 503 { &[("Retry-After", "1")] } else { &[] };
    let _ = write_response(stream, r.status, reason(r.status), extra, body.as_bytes()).await;
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        426 => "Upgrade Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Writes one `Connection: close` response with a JSON body.
pub async fn write_response<S: AsyncWrite + Unpin>(
    stream: &mut S,
    status: u16,
    reason: &str,
    extra: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in extra {
        head.push_str(k);
        head.push_str(": ");
        head.push_str(v);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

/// A JSON response.
pub fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    json_text(status, v.to_string())
}

/// A JSON response from already-formatted JSON text.
pub fn json_text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

/// An error response in the contract's shape.
pub fn error(status: u16, code: &str, message: &str) -> Response<Body> {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = json_text(status, error_body(code, message));
    if status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}
