//! `--redact-keys`: removes configured keys, at any depth, from an event's
//! `data` before the event is stored or sent.
//!
//! Agents put secrets such as `api_key` or `authorization` in tool arguments;
//! the broker must never hand them to a browser or keep them in history.
//! Matching is exact and case-insensitive on the key. Stateless after
//! construction; shared read-only by every publisher task.

use simd_json::prelude::*;
use simd_json::BorrowedValue;

/// The set of keys to strip from event data.
#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Lower-cased keys; small enough that a linear scan beats hashing.
    keys: Vec<String>,
}

impl Redactor {
    pub fn new(keys: Vec<String>) -> Self {
        Redactor {
            keys: keys.into_iter().map(|k| k.trim().to_ascii_lowercase()).filter(|k| !k.is_empty()).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Whether a configured key could occur in the JSON text `data`: one of
    /// them appears in it (ignoring ASCII case), or it holds an escape (a key
    /// could be spelled with `\u` escapes). `false` lets `data` be copied
    /// verbatim.
    pub fn may_match(&self, data: &[u8]) -> bool {
        if self.is_empty() {
            return false;
        }
        data.contains(&b'\\')
            || self
                .keys
                .iter()
                .any(|k| data.windows(k.len().max(1)).any(|w| w.eq_ignore_ascii_case(k.as_bytes())))
    }

    fn matches(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k.eq_ignore_ascii_case(key))
    }

    /// Removes every configured key from `value`, recursing into objects and arrays.
    pub fn redact(&self, value: &mut BorrowedValue<'_>) {
        if self.is_empty() {
            return;
        }
        self.redact_inner(value, 0);
    }

    fn redact_inner(&self, value: &mut BorrowedValue<'_>, depth: usize) {
        // simd-json already bounds nesting depth while parsing; this is a second guard.
        if depth > simd_json::DEFAULT_MAX_DEPTH {
            return;
        }
        if let Some(obj) = value.as_object_mut() {
            let doomed: Vec<_> = obj.keys().filter(|k| self.matches(k)).cloned().collect();
            for k in doomed {
                obj.remove(&k);
            }
            for v in obj.values_mut() {
                self.redact_inner(v, depth + 1);
            }
        } else if let Some(arr) = value.as_array_mut() {
            for v in arr.iter_mut() {
                self.redact_inner(v, depth + 1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_keys_at_any_depth() {
        let r = Redactor::new(vec!["api_key".into(), "Authorization".into()]);
        let mut raw =
            br#"{"api_key":"s1","a":{"AUTHORIZATION":"s2","b":[{"api_key":"s3","keep":1}]}}"#.to_vec();
        let mut v = simd_json::to_borrowed_value(&mut raw).unwrap();
        r.redact(&mut v);
        let out = v.encode();
        assert!(!out.contains("s1") && !out.contains("s2") && !out.contains("s3"), "{out}");
        assert!(out.contains("\"keep\":1"));
    }
}
