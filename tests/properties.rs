//! Property tests over the parsers that face the network: the publish-object
//! parser, the batch splitter, the upgrade-request parser and the
//! client-message parser. Whatever the bytes, they answer (Ok or a typed
//! error) and never panic; and well-formed inputs round-trip.

use proptest::prelude::*;
use switchyard::batch;
use switchyard::listener::client::parse_request;
use switchyard::protocol::{self, Target};
use switchyard::redact::Redactor;

fn user_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:@-]{1,128}"
}

fn event_name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9._:-]{1,64}"
}

fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("user".to_string()),
        Just("users".to_string()),
        Just("event".to_string()),
        Just("data".to_string()),
        Just("priority".to_string()),
        Just("id".to_string()),
        "[a-z]{1,6}",
    ]
}

/// Any JSON value, biased toward what a publish object holds.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "[A-Za-z0-9._:@-]{1,12}".prop_map(Value::from),
        prop_oneof![Just("high"), Just("normal"), Just("low"), Just("Secret")].prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            proptest::collection::vec(("[a-zA-Z]{1,6}", inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn publish_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = protocol::parse_publish(&bytes, &Redactor::default());
    }

    /// The one-pass parser agrees with the serde_json model on arbitrary bytes.
    #[test]
    fn fast_publish_parser_agrees_with_the_model_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let d = switchyard::publish_model::disagreement(&bytes, &[]);
        prop_assert!(d.is_none(), "{:?}", d);
    }

    /// ... and on publish-shaped objects whose fields take any JSON value,
    /// with and without --redact-keys.
    #[test]
    fn fast_publish_parser_agrees_with_the_model_on_publish_shaped_objects(
        fields in proptest::collection::vec((field_name(), json_value()), 0..7),
        redact in any::<bool>(),
        pretty in any::<bool>(),
    ) {
        let mut text = String::from("{");
        for (i, (k, v)) in fields.iter().enumerate() {
            if i > 0 { text.push(','); }
            text.push_str(&serde_json::to_string(k).unwrap());
            text.push(':');
            text.push_str(&if pretty { serde_json::to_string_pretty(v).unwrap() } else { v.to_string() });
        }
        text.push('}');
        let keys: &[&str] = if redact { &["secret"] } else { &[] };
        let d = switchyard::publish_model::disagreement(text.as_bytes(), keys);
        prop_assert!(d.is_none(), "{:?} on {}", d, text);
    }

    #[test]
    fn valid_publish_objects_round_trip(user in user_id(), event in event_name(), n in any::<i64>(), text in ".{0,40}") {
        let obj = serde_json::json!({"user": user, "event": event, "data": {"n": n, "text": text}, "priority": "low"});
        let raw = obj.to_string().into_bytes();
        let p = protocol::parse_publish(&raw, &Redactor::default()).unwrap();
        match p.target { Target::One(u) => prop_assert_eq!(u.as_str(), user.as_str()), _ => prop_assert!(false) }
        prop_assert_eq!(p.event.name(), event.as_str());
        let data: serde_json::Value = serde_json::from_slice(p.event.data()).unwrap();
        prop_assert_eq!(data, obj["data"].clone());
    }

    /// ... and on objects that are mostly valid: a good user and event,
    /// then any value for data, priority or id (so acceptance is common).
    #[test]
    fn fast_publish_parser_agrees_with_the_model_on_mostly_valid_objects(
        user in user_id(), event in event_name(), extra in proptest::collection::vec((field_name(), json_value()), 0..3),
        redact in any::<bool>(),
    ) {
        let mut obj = serde_json::Map::new();
        obj.insert("user".into(), user.into());
        obj.insert("event".into(), event.into());
        for (k, v) in extra {
            obj.insert(k, v);
        }
        let text = serde_json::Value::Object(obj).to_string();
        let keys: &[&str] = if redact { &["secret", "user"] } else { &[] };
        let d = switchyard::publish_model::disagreement(text.as_bytes(), keys);
        prop_assert!(d.is_none(), "{:?} on {}", d, text);
    }

    #[test]
    fn batch_splitter_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = batch::split(&bytes);
    }

    #[test]
    fn batch_splitter_recovers_every_item(items in proptest::collection::vec((user_id(), ".{0,20}"), 0..20), ndjson in any::<bool>()) {
        let objs: Vec<String> = items.iter().map(|(u, t)| serde_json::json!({"user": u, "event": "e", "data": t}).to_string()).collect();
        let body = if ndjson { objs.join("\n") } else { format!("[{}]", objs.join(",")) };
        let split = batch::split(body.as_bytes()).unwrap();
        prop_assert_eq!(split.len(), objs.len());
        for (got, want) in split.iter().zip(&objs) {
            prop_assert_eq!(*got, want.as_bytes());
        }
    }

    #[test]
    fn upgrade_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let _ = parse_request(&bytes, Some("/echo"));
    }

    #[test]
    fn upgrade_parser_reads_any_valid_query(user in user_id(), since in any::<u64>()) {
        let enc: String = user.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect();
        let head = format!("GET /ws?user={enc}&since={since} HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: a2V5\r\n\r\n");
        match parse_request(head.as_bytes(), Some("/echo")) {
            Ok(switchyard::listener::client::Parsed::Upgrade(u)) => {
                prop_assert_eq!(u.query_user.as_deref(), Some(user.as_str()));
                prop_assert_eq!(u.since, Some(since));
            }
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn client_message_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = protocol::parse_client_message(&bytes);
    }
}
