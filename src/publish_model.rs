//! The reference model of a publish object's validation, written the slow,
//! obvious way with `serde_json`'s document tree. The fast parser
//! ([`crate::protocol::parse_publish`], one pass with [`crate::jsonscan`])
//! is held to it by a differential fuzz target (`fuzz/`, `publish_differential`)
//! and a property test: both must accept and reject the same inputs (with
//! the same error code) and produce the same events. Not used by the broker.

use serde_json::Value;

use crate::protocol::{self, Target};
use crate::redact::Redactor;

/// A publish object as the model reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    pub users: Vec<String>,
    /// Addressed with `users` (a list) rather than `user`.
    pub many: bool,
    pub id: Option<String>,
    pub event: String,
    pub priority: String,
    pub data: Value,
}

fn err<T>(code: &'static str) -> Result<T, &'static str> {
    Err(code)
}

/// Validates `raw` as a publish object; the error is the contract's code.
pub fn parse(raw: &[u8], redact_keys: &[&str]) -> Result<Model, &'static str> {
    let Ok(value) = serde_json::from_slice::<Value>(raw) else { return err("invalid_json") };
    let Some(obj) = value.as_object() else { return err("invalid_json") };
    let (users, many) = match (obj.get("user"), obj.get("users")) {
        (Some(_), Some(_)) => return err("invalid_user"),
        (Some(Value::String(u)), None) => (vec![user(u)?], false),
        (Some(_), None) => return err("invalid_user"),
        (None, Some(Value::Array(list))) => {
            if list.is_empty() || list.len() > protocol::MAX_USERS_PER_PUBLISH {
                return err("invalid_user");
            }
            let mut out: Vec<String> = Vec::new();
            for u in list {
                let Value::String(u) = u else { return err("invalid_user") };
                if !out.contains(u) {
                    out.push(user(u)?);
                }
            }
            (out, true)
        }
        (None, Some(_)) => return err("invalid_user"),
        (None, None) => return err("missing_field"),
    };
    let id = match obj.get("id") {
        None => None,
        Some(Value::String(s)) => Some(protocol::parse_idempotency_key(s).map_err(|e| e.code)?.to_string()),
        Some(_) => return err("invalid_id"),
    };
    let event = match obj.get("event") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return err("invalid_event"),
        None => return err("missing_field"),
    };
    protocol::validate_event_name(&event).map_err(|e| e.code)?;
    let priority = match obj.get("priority") {
        None => "normal".to_string(),
        Some(Value::String(s)) => protocol::Priority::parse(s).map_err(|e| e.code)?.as_str().to_string(),
        Some(_) => return err("invalid_priority"),
    };
    let mut data = obj.get("data").cloned().unwrap_or(Value::Null);
    redact(&mut data, redact_keys);
    Ok(Model { users, many, id, event, priority, data })
}

fn user(raw: &str) -> Result<String, &'static str> {
    protocol::UserId::parse(raw).map(|u| u.as_str().to_string()).map_err(|e| e.code)
}

fn redact(v: &mut Value, keys: &[&str]) {
    match v {
        Value::Object(map) => {
            map.retain(|k, _| !keys.iter().any(|r| r.eq_ignore_ascii_case(k)));
            map.values_mut().for_each(|v| redact(v, keys));
        }
        Value::Array(list) => list.iter_mut().for_each(|v| redact(v, keys)),
        _ => {}
    }
}

/// Runs the fast parser and the model on `raw` and says how they disagree,
/// if they do.
pub fn disagreement(raw: &[u8], redact_keys: &[&str]) -> Option<String> {
    let redactor = Redactor::new(redact_keys.iter().map(|k| k.to_string()).collect());
    let fast = protocol::parse_publish(raw, &redactor);
    let model = parse(raw, redact_keys);
    match (fast, model) {
        (Err(f), Err(m)) if f.code == m => None,
        (Err(f), Err(m)) => Some(format!("codes differ: fast {} ({}), model {m}", f.code, f.message)),
        (Ok(_), Err(m)) => Some(format!("fast accepted, model refused with {m}")),
        (Err(f), Ok(_)) => Some(format!("fast refused with {} ({}), model accepted", f.code, f.message)),
        (Ok(p), Ok(m)) => {
            let (users, many): (Vec<String>, bool) = match &p.target {
                Target::One(u) => (vec![u.as_str().to_string()], false),
                Target::Many(us) => (us.iter().map(|u| u.as_str().to_string()).collect(), true),
            };
            let data: Result<Value, _> = serde_json::from_slice(p.event.data());
            let got = Model {
                users,
                many,
                id: p.id.as_deref().map(str::to_string),
                event: p.event.name().to_string(),
                priority: p.event.priority.as_str().to_string(),
                data: data.unwrap_or(Value::String("<fast data is not JSON>".into())),
            };
            (got != m).then(|| format!("events differ: fast {got:?}, model {m:?}"))
        }
    }
}
