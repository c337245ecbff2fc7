//! The client-frame handler's message parser: any text gives a ping or a
//! typed bad_request, never a panic; answers always encode.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::protocol::{self, ClientMessage};

fuzz_target!(|data: &[u8]| {
    match protocol::parse_client_message(data) {
        Ok(ClientMessage::Ping(id)) => {
            let _ = protocol::encode_pong(&id);
        }
        Err(e) => {
            assert_eq!(e.code, "bad_request");
            let _ = protocol::encode_client_error(e.code, &e.message);
        }
    }
});
