//! switchyard-load: a load generator that is also a delivery checker.
//!
//! `check` verifies every received event (once, in order, own user only);
//! `trace` reads recorded event traces and turns them into a schedule;
//! `sse` is the client side of `GET /sse`; `relay` is the no-broker
//! stand-in that gives the latency floor; `wsclient` reads server frames
//! in place for the client connections.

pub mod ceiling;
pub mod check;
pub mod nats;
pub mod relay;
pub mod sse;
pub mod trace;
pub mod wsclient;

/// WebSocket settings for the tungstenite connections: the generator's
/// publisher streams and the relay's (client connections use [`wsclient`]).
/// tungstenite zero-fills its whole read buffer (128 KiB by default) before
/// every socket read; with thousands of connections each reading small
/// frames that memset was 37% of the load generator's CPU (perf), so the
/// buffer is kept small.
pub fn ws_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(8 * 1024)
}
