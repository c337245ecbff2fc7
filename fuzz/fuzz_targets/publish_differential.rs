//! The fast publish parser against the serde_json model: both accept and
//! refuse the same inputs, with the same error code, and produce the same
//! events. The first byte picks whether `--redact-keys` is set (so the
//! redaction path is compared too).
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::publish_model;

fuzz_target!(|data: &[u8]| {
    let (keys, raw): (&[&str], &[u8]) = match data.split_first() {
        Some((b, rest)) if b & 1 == 1 => (&["secret", "api_key"], rest),
        Some((_, rest)) => (&[], rest),
        None => (&[], data),
    };
    if let Some(why) = publish_model::disagreement(raw, keys) {
        panic!("{why}\ninput: {:?}", String::from_utf8_lossy(raw));
    }
});
