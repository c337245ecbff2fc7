//! The publish-object parser: any bytes give Ok or a typed error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::protocol;
use switchyard::redact::Redactor;

fuzz_target!(|data: &[u8]| {
    let redactor = Redactor::new(vec!["api_key".into(), "authorization".into()]);
    if let Ok(p) = protocol::parse_publish(data, &redactor) {
        // Whatever was accepted encodes into a well-formed frame whose data is JSON.
        let frame = protocol::encode_event_frame(1, &p.event, 0);
        assert!(frame.len() > p.event.data().len());
        assert!(serde_json_check(p.event.data()));
    }
});

fn serde_json_check(data: &[u8]) -> bool {
    // Re-parse the event's data with the same parser the broker uses.
    let mut wrapped = b"{\"user\":\"u\",\"event\":\"e\",\"data\":".to_vec();
    wrapped.extend_from_slice(data);
    wrapped.push(b'}');
    protocol::parse_publish(&wrapped, &Redactor::default()).is_ok()
}
