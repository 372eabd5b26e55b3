//! Client request bodies: any bytes give a parsed request or a 400, never a
//! panic; a parsed request always re-serialises for its upstream.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate_collector::proxy::request::{ClientRequest, Endpoint};

fuzz_target!(|data: &[u8]| {
    for endpoint in [Endpoint::ChatCompletions, Endpoint::Completions, Endpoint::Embeddings] {
        if let Ok(mut req) = ClientRequest::parse(endpoint, Bytes::copy_from_slice(data)) {
            let body = req.upstream_body("target-model");
            assert!(serde_json_valid(&body));
        }
    }
});

fn serde_json_valid(b: &[u8]) -> bool {
    // The re-serialised body must itself be a strict, valid request body.
    ClientRequest::parse(Endpoint::Embeddings, Bytes::copy_from_slice(b)).is_ok()
        || ClientRequest::parse(Endpoint::ChatCompletions, Bytes::copy_from_slice(b)).is_ok()
        || ClientRequest::parse(Endpoint::Completions, Bytes::copy_from_slice(b)).is_ok()
}
