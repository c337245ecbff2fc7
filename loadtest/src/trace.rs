//! Event traces (`.jsonl`): one event per line, replayed per user.
//!
//! Format — each line is a JSON object:
//! `{"at_ms": 120, "event": "agent_thinking", "priority": "normal", "bytes": 180}`
//! - `at_ms`: offset from the start of the session, in milliseconds;
//! - `event`: the event name published;
//! - `priority`: `high` | `normal` | `low` (default `normal`);
//! - `bytes`: size of the `data` padding to send (default 64).
//!
//! Lines starting with `#` and blank lines are ignored.

use std::time::Duration;

use anyhow::{bail, Context};

#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct TraceEvent {
    pub at_ms: u64,
    pub event: String,
    #[serde(default = "normal")]
    pub priority: String,
    #[serde(default = "default_bytes")]
    pub bytes: usize,
}

fn normal() -> String {
    "normal".into()
}

fn default_bytes() -> usize {
    64
}

/// Parses a trace; events come back sorted by `at_ms`.
pub fn parse(text: &str) -> anyhow::Result<Vec<TraceEvent>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let ev: TraceEvent = serde_json::from_str(line).with_context(|| format!("trace line {}", i + 1))?;
        if !matches!(ev.priority.as_str(), "high" | "normal" | "low") {
            bail!("trace line {}: unknown priority {:?}", i + 1, ev.priority);
        }
        out.push(ev);
    }
    if out.is_empty() {
        bail!("the trace holds no events");
    }
    out.sort_by_key(|e| e.at_ms);
    Ok(out)
}

/// One scheduled publish: when, to which user, what.
#[derive(Debug, Clone)]
pub struct Planned {
    pub at: Duration,
    pub user: usize,
    pub event: usize,
}

/// Replays `trace` for `users` users, each starting at a staggered offset
/// within `stagger`, with times divided by `speed`. Sorted by time.
pub fn schedule(
    trace: &[TraceEvent],
    users: usize,
    speed: f64,
    stagger: Duration,
    seed: u64,
) -> Vec<Planned> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut plan = Vec::with_capacity(trace.len() * users);
    for user in 0..users {
        let offset = stagger.mul_f64(rng.f64());
        for (event, ev) in trace.iter().enumerate() {
            let at = offset + Duration::from_millis(ev.at_ms).div_f64(speed.max(1e-6));
            plan.push(Planned { at, user, event });
        }
    }
    plan.sort_by_key(|p| p.at);
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_traces_parse() {
        for name in ["agent_session.jsonl", "bursty_fanout.jsonl"] {
            let path = format!("{}/traces/{name}", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&path).unwrap();
            let t = parse(&text).unwrap();
            assert!(t.len() > 10, "{name}");
        }
    }

    #[test]
    fn schedule_scales_and_staggers() {
        let t = parse("{\"at_ms\":0,\"event\":\"a\"}\n{\"at_ms\":1000,\"event\":\"b\"}").unwrap();
        let p = schedule(&t, 3, 2.0, Duration::ZERO, 1);
        assert_eq!(p.len(), 6);
        assert_eq!(p.last().unwrap().at, Duration::from_millis(500));
        assert!(parse("{\"at_ms\":0,\"event\":\"a\",\"priority\":\"urgent\"}").is_err());
    }
}
