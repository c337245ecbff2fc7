//! The upgrade-request parser (WebSocket and SSE) and authenticator: any
//! request head gives a parsed request or a refusal with a 4xx status, never
//! a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::auth::{Authenticator, Credentials};
use switchyard::listener::client::{parse_request, Parsed};

fuzz_target!(|data: &[u8]| {
    match parse_request(data, Some("/echo")) {
        Ok(Parsed::Upgrade(up) | Parsed::Sse(up)) => {
            let creds = Credentials {
                query_user: up.query_user.as_deref(),
                query_token: up.query_token.as_deref(),
                bearer: up.bearer.as_deref(),
            };
            let _ = Authenticator::new(None).authenticate(&creds);
            let _ = Authenticator::new(Some(b"fuzz-secret")).authenticate(&creds);
        }
        Ok(Parsed::Health | Parsed::Ready | Parsed::Echo(_)) => {}
        Err(r) => assert!((400..500).contains(&r.status)),
    }
});
