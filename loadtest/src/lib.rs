//! switchyard-load: a load generator that is also a delivery checker.
//!
//! `check` verifies every received event (once, in order, own user only);
//! `trace` reads recorded event traces and turns them into a schedule;
//! `sse` is the client side of `GET /sse`; `relay` is the no-broker
//! stand-in that gives the latency floor.

pub mod ceiling;
pub mod check;
pub mod nats;
pub mod relay;
pub mod sse;
pub mod trace;
