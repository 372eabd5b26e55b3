//! The Arrow schema of `UsageEvent` v1: the lake's column layout.
//!
//! Kept beside the Rust type and the JSON Schema (`usage_event.v1.json`);
//! the tests below hold the three in step. Column types are chosen for SQL
//! (signed integers, exact decimals for money) and for size on disk (the
//! event id as 16 bytes rather than 36 characters).

use std::sync::{Arc, LazyLock};

use arrow_schema::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};

use crate::money::Usd;

/// Precision of the money columns; scale is [`Usd::SCALE`]. Eighteen digits
/// keep each amount in Parquet's INT64, read as plain integers, where more
/// would store 16-byte fixed-length values that readers convert one by one;
/// they still hold $99,999,999.9999999999 per event, and SQL sums widen.
pub const MONEY_PRECISION: u8 = 18;

pub fn money_type() -> DataType {
    DataType::Decimal128(MONEY_PRECISION, Usd::SCALE as i8)
}

/// Whether an amount fits the money columns (larger ones are refused at
/// ingest rather than truncated by the Parquet writer).
pub fn money_fits(amount: Usd) -> bool {
    amount.to_scaled().unsigned_abs() < 10u128.pow(u32::from(MONEY_PRECISION))
}

pub fn timestamp_type() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

/// The event id column: a UUIDv7 as its 16 bytes, a plain
/// `FIXED_LEN_BYTE_ARRAY(16)` in Parquet. Not annotated as a UUID: Spark 4
/// refuses that annotation (`Illegal Parquet type: FIXED_LEN_BYTE_ARRAY
/// (UUID)`), while every reader takes plain 16 bytes, at the same size and
/// with min/max file skipping DuckDB does not do on its UUID type. Files
/// written before carry the annotation; readers take both (`tollgate
/// compact` rewrites them).
pub fn event_id_field() -> Field {
    Field::new("event_id", DataType::FixedSizeBinary(16), false)
}

pub fn attempt_fields() -> Fields {
    Fields::from(vec![
        Field::new("upstream", DataType::Utf8, false),
        Field::new("provider", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("status", DataType::Int32, true),
        Field::new("error", DataType::Utf8, true),
        Field::new("latency_ms", DataType::Int64, false),
        Field::new("input_tokens", DataType::Int64, false),
        Field::new("cached_input_tokens", DataType::Int64, false),
        Field::new("output_tokens", DataType::Int64, false),
        Field::new("reasoning_tokens", DataType::Int64, false),
        Field::new("token_source", DataType::Utf8, true),
        Field::new("cost_usd", money_type(), true),
    ])
}

pub fn tags_type() -> DataType {
    let entries = Field::new(
        "entries",
        DataType::Struct(Fields::from(vec![
            Field::new("key", DataType::Utf8, false),
            Field::new("value", DataType::Utf8, true),
        ])),
        false,
    );
    DataType::Map(Arc::new(entries), false)
}

pub fn attempts_type() -> DataType {
    DataType::List(Arc::new(Field::new(
        "item",
        DataType::Struct(attempt_fields()),
        true,
    )))
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let utf8 = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
    let i64 = |name: &str, nullable| Field::new(name, DataType::Int64, nullable);
    let boolean = |name: &str| Field::new(name, DataType::Boolean, false);
    Arc::new(Schema::new(vec![
        // Identity
        event_id_field(),
        Field::new("schema_version", DataType::Int32, false),
        utf8("request_id", true),
        utf8("trace_id", true),
        utf8("gateway_instance", false),
        // Time
        Field::new("ts_start", timestamp_type(), false),
        Field::new("ts_end", timestamp_type(), false),
        i64("latency_ms", false),
        i64("ttft_ms", true),
        i64("upstream_latency_ms", true),
        i64("gateway_overhead_us", false),
        // Who
        utf8("consumer", true),
        utf8("team", true),
        utf8("api_key_id", true),
        utf8("client_ip", true),
        Field::new("tags", tags_type(), false),
        // What
        utf8("endpoint", false),
        utf8("requested_model", true),
        utf8("served_model", true),
        utf8("provider", true),
        utf8("upstream", true),
        boolean("stream"),
        boolean("fallback"),
        utf8("fallback_from", true),
        utf8("fallback_reason", true),
        Field::new("attempts", attempts_type(), false),
        // Outcome
        Field::new("status", DataType::Int32, false),
        utf8("outcome", false),
        utf8("error_type", true),
        // Tokens
        i64("input_tokens", false),
        i64("cached_input_tokens", false),
        i64("output_tokens", false),
        i64("reasoning_tokens", false),
        utf8("token_source", true),
        // Cache
        utf8("cache", false),
        utf8("cache_kind", true),
        // Money
        Field::new("cost_usd", money_type(), true),
        Field::new("cost_saved_usd", money_type(), true),
        utf8("price_version", true),
        // Limits
        boolean("rate_limited"),
        utf8("limit_key", true),
    ]))
});

/// The Arrow schema of the `usage` table's stored columns (the `date` and
/// `hour` partition columns live in the lake's paths, not in the files).
pub fn usage_schema() -> SchemaRef {
    SCHEMA.clone()
}
