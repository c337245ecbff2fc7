//! `--redact-keys`: removes configured keys, at any depth, from an event's
//! `data` before the event is stored or sent.
//!
//! Agents put secrets such as `api_key` or `authorization` in tool arguments;
//! the broker must never hand them to a browser or keep them in history.
//! Matching is exact and case-insensitive on the key. Stateless after
//! construction; shared read-only by every publisher task.

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

    /// Whether `key` is one of the configured keys (ASCII case ignored).
    pub fn is_redacted(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k.eq_ignore_ascii_case(key))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_keys_at_any_depth_through_the_publish_path() {
        let r = Redactor::new(vec!["api_key".into(), "Authorization".into()]);
        let raw = br#"{"user":"u","event":"e","data":{"api_key":"s1","a":{"AUTHORIZATION":"s2","b":[{"api_key":"s3","keep":1}]}}}"#;
        let p = crate::protocol::parse_publish(raw, &r).unwrap();
        let out = std::str::from_utf8(p.event.data()).unwrap();
        assert!(!out.contains("s1") && !out.contains("s2") && !out.contains("s3"), "{out}");
        assert_eq!(out, r#"{"a":{"b":[{"keep":1}]}}"#);
    }

    #[test]
    fn data_that_cannot_hold_a_key_is_copied_verbatim() {
        let r = Redactor::new(vec!["api_key".into()]);
        assert!(!r.may_match(br#"{"x": [1, 2]}"#));
        assert!(r.may_match(br#"{"API_KEY":1}"#), "case is ignored");
        assert!(r.may_match(br#"{"\u0061pi_key":1}"#), "an escape could spell it");
        assert!(!Redactor::default().may_match(br#"{"api_key":1}"#));
    }
}
