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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn publish_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut b = bytes;
        let _ = protocol::parse_publish(&mut b, &Redactor::default());
    }

    #[test]
    fn valid_publish_objects_round_trip(user in user_id(), event in event_name(), n in any::<i64>(), text in ".{0,40}") {
        let obj = serde_json::json!({"user": user, "event": event, "data": {"n": n, "text": text}, "priority": "low"});
        let mut raw = obj.to_string().into_bytes();
        let p = protocol::parse_publish(&mut raw, &Redactor::default()).unwrap();
        match p.target { Target::One(u) => prop_assert_eq!(u.as_str(), user.as_str()), _ => prop_assert!(false) }
        prop_assert_eq!(&*p.event.name, event.as_str());
        let data: serde_json::Value = serde_json::from_slice(&p.event.data).unwrap();
        prop_assert_eq!(data, obj["data"].clone());
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
