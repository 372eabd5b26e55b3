//! Upstream JSON documents (a body, or one event's data) on arbitrary
//! bytes: reading never panics, subsets never exceed their parents, the
//! model span points at a JSON string inside the input, and renaming
//! leaves valid JSON valid.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use tollgate_collector::relay::rename::Rename;
use tollgate_collector::upstream::response::Document;
use tollgate_collector::ledger::tally::Tally;

fuzz_target!(|data: &[u8]| {
    let Some(doc) = Document::parse(data) else { return };
    let mut tally = Tally::default();
    tally.read(&doc);
    let (usage, _) = tally.settle(None);
    assert!(usage.tokens.cached_input <= usage.tokens.input);
    assert!(usage.tokens.reasoning <= usage.tokens.output);
    let _ = (doc.has_content(), doc.finished(), doc.error(), doc.is_usage_only());
    if let Some((span, _)) = doc.model(data) {
        assert!(data[span.clone()].starts_with(b"\"") && data[span].ends_with(b"\""));
        let body = Bytes::copy_from_slice(data);
        let renamed = Rename::new("renamed").body(&body, &doc);
        assert!(serde_json::from_slice::<serde_json::Value>(&renamed).is_ok());
    }
});
