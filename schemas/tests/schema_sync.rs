//! The Rust type, the Arrow schema and the JSON Schema describe one event:
//! same fields, same nullability, compatible types.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers fail loudly

use std::collections::{BTreeMap, BTreeSet};
use std::str::FromStr;

use arrow_schema::{DataType, Fields};
use chrono::DateTime;
use serde_json::Value;
use tollgate_schemas::{
    Attempt, CacheKind, CacheStatus, Outcome, SCHEMA_VERSION, TokenSource, UsageEvent, Usd,
    usage_schema,
};
use uuid::Uuid;

fn json_schema() -> Value {
    let text = include_str!("../usage_event.v1.json");
    serde_json::from_str(text).unwrap()
}

fn attempt(full: bool) -> Attempt {
    let some = |s: &str| full.then(|| s.to_string());
    Attempt {
        upstream: "deepseek".into(),
        provider: "openai".into(),
        model: "deepseek-reasoner".into(),
        status: full.then_some(503),
        error: some("5xx"),
        latency_ms: 30,
        input_tokens: 10,
        cached_input_tokens: 0,
        output_tokens: 0,
        reasoning_tokens: 0,
        token_source: full.then_some(TokenSource::Estimated),
        cost_usd: full.then_some(Usd::ZERO),
    }
}

/// Every optional field set (`full`) or every optional field empty.
fn event(full: bool) -> UsageEvent {
    let some = |s: &str| full.then(|| s.to_string());
    let t = DateTime::from_timestamp_micros(1_764_151_200_123_456).unwrap();
    UsageEvent {
        event_id: Uuid::now_v7(),
        schema_version: SCHEMA_VERSION,
        request_id: some("req_1"),
        trace_id: some("4bf92f3577b34da6a3ce929d0e0e4736"),
        gateway_instance: "gw-1".into(),
        ts_start: t,
        ts_end: t,
        latency_ms: 5,
        ttft_ms: full.then_some(1),
        upstream_latency_ms: full.then_some(4),
        gateway_overhead_us: 80,
        consumer: some("search-app"),
        team: some("search"),
        api_key_id: some("k_1a2b3c4d"),
        client_ip: some("127.0.0.1"),
        tags: BTreeMap::from([("feature".into(), "search".into())]),
        endpoint: "chat/completions".into(),
        requested_model: some("deepseek-r1"),
        served_model: some("qwq-32b"),
        provider: some("simulated"),
        upstream: some("sim"),
        stream: true,
        fallback: full,
        fallback_from: some("deepseek-r1"),
        fallback_reason: some("5xx"),
        attempts: vec![attempt(full)],
        status: 200,
        outcome: Outcome::Ok,
        error_type: some("upstream_error"),
        input_tokens: 10,
        cached_input_tokens: 2,
        output_tokens: 5,
        reasoning_tokens: 1,
        token_source: full.then_some(TokenSource::Upstream),
        cache: CacheStatus::Miss,
        cache_kind: full.then_some(CacheKind::Exact),
        cost_usd: full.then(|| Usd::from_str("0.00029").unwrap()),
        cost_saved_usd: full.then_some(Usd::ZERO),
        price_version: some("2025-09-01"),
        rate_limited: full,
        limit_key: some("tpm:search-app"),
    }
}

fn allows_null(prop: &Value) -> bool {
    match (prop.get("type"), prop.get("enum")) {
        (Some(Value::Array(types)), _) => types.iter().any(|t| t == "null"),
        (_, Some(Value::Array(values))) => values.iter().any(Value::is_null),
        _ => false,
    }
}

fn json_types(prop: &Value) -> BTreeSet<String> {
    if let Some(values) = prop.get("enum").and_then(Value::as_array) {
        return values
            .iter()
            .map(|v| if v.is_null() { "null" } else { "string" }.to_string())
            .collect();
    }
    if prop.get("$ref").is_some() {
        return BTreeSet::from(["object".to_string()]);
    }
    match prop.get("type") {
        Some(Value::String(t)) => BTreeSet::from([t.clone()]),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(|t| t.as_str().map(String::from))
            .collect(),
        _ => panic!("property without a type: {prop}"),
    }
}

/// The JSON type an Arrow column's values are written as in the message.
fn json_type_of(data_type: &DataType) -> &'static str {
    match data_type {
        DataType::Utf8 | DataType::FixedSizeBinary(16) => "string",
        DataType::Int32 | DataType::Int64 | DataType::Timestamp(..) => "integer",
        DataType::Decimal128(..) => "number",
        DataType::Boolean => "boolean",
        DataType::Map(..) | DataType::Struct(..) => "object",
        DataType::List(..) => "array",
        other => panic!("no JSON mapping for {other}"),
    }
}

/// Checks one object level: the serialized sample keys, the JSON Schema's
/// properties and required list, and the Arrow fields all agree.
fn check_level(
    schema_props: &serde_json::Map<String, Value>,
    required: &Value,
    fields: &Fields,
    full: &Value,
    bare: &Value,
) {
    let props: BTreeSet<&str> = schema_props.keys().map(String::as_str).collect();
    let arrow: BTreeSet<&str> = fields.iter().map(|f| f.name().as_str()).collect();
    let serialized: BTreeSet<&str> = full
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    let required: BTreeSet<&str> = required
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(props, serialized, "JSON Schema properties vs the Rust type");
    assert_eq!(arrow, serialized, "Arrow fields vs the Rust type");
    assert_eq!(
        required, serialized,
        "every field is always present (null when unknown)"
    );

    for field in fields {
        let name = field.name();
        let prop = &schema_props[name];
        let bare_is_null = bare[name].is_null();
        assert_eq!(
            field.is_nullable(),
            allows_null(prop),
            "{name}: Arrow vs JSON Schema nullability"
        );
        assert_eq!(
            field.is_nullable(),
            bare_is_null,
            "{name}: Arrow nullability vs Option in Rust"
        );
        assert!(
            !full[name].is_null(),
            "{name}: the full sample sets every field"
        );
        let types = json_types(prop);
        let want = json_type_of(field.data_type());
        assert!(
            types.contains(want),
            "{name}: JSON Schema {types:?} vs Arrow {}",
            field.data_type()
        );
    }
}

#[test]
fn rust_arrow_and_json_schema_agree() {
    let schema = json_schema();
    let full = serde_json::to_value(event(true)).unwrap();
    let bare = serde_json::to_value(event(false)).unwrap();
    let arrow = usage_schema();
    check_level(
        schema["properties"].as_object().unwrap(),
        &schema["required"],
        arrow.fields(),
        &full,
        &bare,
    );

    let attempt_def = &schema["$defs"]["attempt"];
    let DataType::List(item) = arrow.field_with_name("attempts").unwrap().data_type() else {
        panic!("attempts is a list");
    };
    let DataType::Struct(attempt_fields) = item.data_type() else {
        panic!("attempts holds structs");
    };
    check_level(
        attempt_def["properties"].as_object().unwrap(),
        &attempt_def["required"],
        attempt_fields,
        &full["attempts"][0],
        &bare["attempts"][0],
    );
}

#[test]
fn json_schema_enums_match_the_rust_enums() {
    let schema = json_schema();
    let enum_of = |name: &str| -> BTreeSet<String> {
        schema["properties"][name]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect()
    };
    let outcomes = [
        Outcome::Ok,
        Outcome::UpstreamError,
        Outcome::RateLimited,
        Outcome::BudgetExceeded,
        Outcome::Blocked,
        Outcome::ClientCancelled,
        Outcome::InvalidRequest,
        Outcome::Unauthorized,
    ];
    let names: BTreeSet<String> = outcomes.iter().map(|o| o.as_str().to_string()).collect();
    assert_eq!(enum_of("outcome"), names);
    let caches: BTreeSet<String> = [CacheStatus::Hit, CacheStatus::Miss, CacheStatus::Bypass]
        .iter()
        .map(|c| {
            serde_json::to_value(c)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(enum_of("cache"), caches);
}

#[test]
fn the_schema_version_is_the_files_version() {
    let schema = json_schema();
    let id = schema["$id"].as_str().unwrap();
    assert!(
        id.ends_with(&format!("usage_event.v{SCHEMA_VERSION}.json")),
        "{id}"
    );
}
