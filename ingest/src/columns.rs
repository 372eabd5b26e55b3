//! `UsageEvent`s to Arrow columns and back, in the lake's schema.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow_array::builder::{
    BooleanBuilder, Decimal128Builder, FixedSizeBinaryBuilder, Int32Builder, Int64Builder,
    MapBuilder, MapFieldNames, StringBuilder, TimestampMicrosecondBuilder,
};
use arrow_array::cast::AsArray;
use arrow_array::types::{Decimal128Type, Int32Type, Int64Type, TimestampMicrosecondType};
use arrow_array::{Array, ArrayRef, ListArray, RecordBatch, StructArray};
use arrow_buffer::OffsetBuffer;
use arrow_schema::{ArrowError, DataType};
use chrono::DateTime;
use tollgate_schemas::arrow::{MONEY_PRECISION, attempt_fields};
use tollgate_schemas::{
    Attempt, CacheKind, CacheStatus, Outcome, TokenSource, UsageEvent, Usd, usage_schema,
};
use uuid::Uuid;

fn money_builder(n: usize) -> Result<Decimal128Builder, ArrowError> {
    Decimal128Builder::with_capacity(n).with_precision_and_scale(MONEY_PRECISION, Usd::SCALE as i8)
}

/// The writer narrows money to INT64 unchecked: refuse rather than wrap.
fn finish_money(mut b: Decimal128Builder) -> Result<ArrayRef, ArrowError> {
    let a = b.finish();
    a.validate_decimal_precision(MONEY_PRECISION)?;
    Ok(Arc::new(a))
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Builds one record batch in the lake's schema; rows keep their order.
pub fn to_batch(events: &[UsageEvent]) -> Result<RecordBatch, ArrowError> {
    let n = events.len();
    let str_col = |f: &dyn Fn(&UsageEvent) -> Option<&str>| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(n, n * 8);
        for e in events {
            b.append_option(f(e));
        }
        Arc::new(b.finish())
    };
    let i64_col = |f: &dyn Fn(&UsageEvent) -> Option<u64>| -> ArrayRef {
        let mut b = Int64Builder::with_capacity(n);
        for e in events {
            b.append_option(f(e).map(i64_of));
        }
        Arc::new(b.finish())
    };
    let bool_col = |f: &dyn Fn(&UsageEvent) -> bool| -> ArrayRef {
        let mut b = BooleanBuilder::with_capacity(n);
        for e in events {
            b.append_value(f(e));
        }
        Arc::new(b.finish())
    };
    let ts_col = |f: &dyn Fn(&UsageEvent) -> i64| -> ArrayRef {
        let mut b = TimestampMicrosecondBuilder::with_capacity(n).with_timezone("UTC");
        for e in events {
            b.append_value(f(e));
        }
        Arc::new(b.finish())
    };
    let money_col = |f: &dyn Fn(&UsageEvent) -> Option<Usd>| -> Result<ArrayRef, ArrowError> {
        let mut b = money_builder(n)?;
        for e in events {
            b.append_option(f(e).map(|u| u.to_scaled()));
        }
        finish_money(b)
    };
    let i32_col = |f: &dyn Fn(&UsageEvent) -> i32| -> ArrayRef {
        let mut b = Int32Builder::with_capacity(n);
        for e in events {
            b.append_value(f(e));
        }
        Arc::new(b.finish())
    };

    let mut ids = FixedSizeBinaryBuilder::with_capacity(n, 16);
    for e in events {
        ids.append_value(e.event_id.as_bytes())?;
    }

    let mut tags = MapBuilder::new(
        Some(MapFieldNames {
            entry: "entries".into(),
            key: "key".into(),
            value: "value".into(),
        }),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    for e in events {
        for (k, v) in &e.tags {
            tags.keys().append_value(k);
            tags.values().append_value(v);
        }
        tags.append(true)?;
    }

    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        i32_col(&|e| i32::from(e.schema_version)),
        str_col(&|e| e.request_id.as_deref()),
        str_col(&|e| e.trace_id.as_deref()),
        str_col(&|e| Some(e.gateway_instance.as_str())),
        ts_col(&|e| e.ts_start.timestamp_micros()),
        ts_col(&|e| e.ts_end.timestamp_micros()),
        i64_col(&|e| Some(e.latency_ms)),
        i64_col(&|e| e.ttft_ms),
        i64_col(&|e| e.upstream_latency_ms),
        i64_col(&|e| Some(e.gateway_overhead_us)),
        str_col(&|e| e.consumer.as_deref()),
        str_col(&|e| e.team.as_deref()),
        str_col(&|e| e.api_key_id.as_deref()),
        str_col(&|e| e.client_ip.as_deref()),
        Arc::new(tags.finish()),
        str_col(&|e| Some(e.endpoint.as_str())),
        str_col(&|e| e.requested_model.as_deref()),
        str_col(&|e| e.served_model.as_deref()),
        str_col(&|e| e.provider.as_deref()),
        str_col(&|e| e.upstream.as_deref()),
        bool_col(&|e| e.stream),
        bool_col(&|e| e.fallback),
        str_col(&|e| e.fallback_from.as_deref()),
        str_col(&|e| e.fallback_reason.as_deref()),
        attempts_column(events)?,
        i32_col(&|e| i32::from(e.status)),
        str_col(&|e| Some(e.outcome.as_str())),
        str_col(&|e| e.error_type.as_deref()),
        i64_col(&|e| Some(e.input_tokens)),
        i64_col(&|e| Some(e.cached_input_tokens)),
        i64_col(&|e| Some(e.output_tokens)),
        i64_col(&|e| Some(e.reasoning_tokens)),
        str_col(&|e| e.token_source.map(token_source_name)),
        str_col(&|e| Some(cache_name(e.cache))),
        str_col(&|e| e.cache_kind.map(cache_kind_name)),
        money_col(&|e| e.cost_usd)?,
        money_col(&|e| e.cost_saved_usd)?,
        str_col(&|e| e.price_version.as_deref()),
        bool_col(&|e| e.rate_limited),
        str_col(&|e| e.limit_key.as_deref()),
    ];
    RecordBatch::try_new(usage_schema(), columns)
}

fn token_source_name(t: TokenSource) -> &'static str {
    match t {
        TokenSource::Upstream => "upstream",
        TokenSource::Estimated => "estimated",
    }
}

fn cache_name(c: CacheStatus) -> &'static str {
    match c {
        CacheStatus::Hit => "hit",
        CacheStatus::Miss => "miss",
        CacheStatus::Bypass => "bypass",
    }
}

fn cache_kind_name(c: CacheKind) -> &'static str {
    match c {
        CacheKind::Exact => "exact",
        CacheKind::Semantic => "semantic",
    }
}

fn attempts_column(events: &[UsageEvent]) -> Result<ArrayRef, ArrowError> {
    let all: Vec<&Attempt> = events.iter().flat_map(|e| &e.attempts).collect();
    let m = all.len();
    let strs = |f: &dyn Fn(&Attempt) -> Option<&str>| -> ArrayRef {
        let mut b = StringBuilder::with_capacity(m, m * 8);
        for a in &all {
            b.append_option(f(a));
        }
        Arc::new(b.finish())
    };
    let ints = |f: &dyn Fn(&Attempt) -> u64| -> ArrayRef {
        let mut b = Int64Builder::with_capacity(m);
        for a in &all {
            b.append_value(i64_of(f(a)));
        }
        Arc::new(b.finish())
    };
    let mut status = Int32Builder::with_capacity(m);
    let mut cost = money_builder(m)?;
    for a in &all {
        status.append_option(a.status.map(i32::from));
        cost.append_option(a.cost_usd.map(|u| u.to_scaled()));
    }
    let cost = finish_money(cost)?;
    let values = StructArray::try_new(
        attempt_fields(),
        vec![
            strs(&|a| Some(a.upstream.as_str())),
            strs(&|a| Some(a.provider.as_str())),
            strs(&|a| Some(a.model.as_str())),
            Arc::new(status.finish()),
            strs(&|a| a.error.as_deref()),
            ints(&|a| a.latency_ms),
            ints(&|a| a.input_tokens),
            ints(&|a| a.cached_input_tokens),
            ints(&|a| a.output_tokens),
            ints(&|a| a.reasoning_tokens),
            strs(&|a| a.token_source.map(token_source_name)),
            cost,
        ],
        None,
    )?;
    let offsets = OffsetBuffer::from_lengths(events.iter().map(|e| e.attempts.len()));
    let DataType::List(item) = tollgate_schemas::arrow::attempts_type() else {
        return Err(ArrowError::SchemaError("attempts is a list".into()));
    };
    Ok(Arc::new(ListArray::try_new(
        item,
        offsets,
        Arc::new(values),
        None,
    )?))
}

// ------------------------------------------------------------ and back

/// Reads a batch in the lake's schema (as written, or as read back from
/// Parquet) into events. Columns are found by name, so files written by an
/// older schema version read as long as their columns exist.
pub fn from_batch(batch: &RecordBatch) -> Result<Vec<UsageEvent>, ArrowError> {
    let col = |name: &str| -> Result<&ArrayRef, ArrowError> {
        batch
            .column_by_name(name)
            .ok_or_else(|| ArrowError::SchemaError(format!("missing column {name}")))
    };
    let s = |name: &str| -> Result<Strs<'_>, ArrowError> { Strs::new(col(name)?) };
    let i = |name: &str| -> Result<&arrow_array::PrimitiveArray<Int64Type>, ArrowError> {
        col(name)?
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| ArrowError::SchemaError(format!("{name}: not Int64")))
    };
    let i32c = |name: &str| -> Result<&arrow_array::PrimitiveArray<Int32Type>, ArrowError> {
        col(name)?
            .as_primitive_opt::<Int32Type>()
            .ok_or_else(|| ArrowError::SchemaError(format!("{name}: not Int32")))
    };
    let b = |name: &str| -> Result<&arrow_array::BooleanArray, ArrowError> {
        col(name)?
            .as_boolean_opt()
            .ok_or_else(|| ArrowError::SchemaError(format!("{name}: not Boolean")))
    };
    let ts =
        |name: &str| -> Result<&arrow_array::PrimitiveArray<TimestampMicrosecondType>, ArrowError> {
            col(name)?
                .as_primitive_opt::<TimestampMicrosecondType>()
                .ok_or_else(|| ArrowError::SchemaError(format!("{name}: not Timestamp(us)")))
        };
    let money = |name: &str| -> Result<&arrow_array::PrimitiveArray<Decimal128Type>, ArrowError> {
        col(name)?
            .as_primitive_opt::<Decimal128Type>()
            .ok_or_else(|| ArrowError::SchemaError(format!("{name}: not Decimal128")))
    };
    let ids = col("event_id")?
        .as_fixed_size_binary_opt()
        .ok_or_else(|| ArrowError::SchemaError("event_id: not FixedSizeBinary".into()))?;
    let (version, request_id, trace_id, instance) = (
        i32c("schema_version")?,
        s("request_id")?,
        s("trace_id")?,
        s("gateway_instance")?,
    );
    let (ts_start, ts_end) = (ts("ts_start")?, ts("ts_end")?);
    let (latency, ttft, upstream_latency, overhead) = (
        i("latency_ms")?,
        i("ttft_ms")?,
        i("upstream_latency_ms")?,
        i("gateway_overhead_us")?,
    );
    let (consumer, team, key_id, ip) = (
        s("consumer")?,
        s("team")?,
        s("api_key_id")?,
        s("client_ip")?,
    );
    let tags = col("tags")?
        .as_map_opt()
        .ok_or_else(|| ArrowError::SchemaError("tags: not a map".into()))?;
    let tag_keys = Strs::new(tags.keys())?;
    let tag_values = Strs::new(tags.values())?;
    let (endpoint, requested, served, provider, upstream) = (
        s("endpoint")?,
        s("requested_model")?,
        s("served_model")?,
        s("provider")?,
        s("upstream")?,
    );
    let (stream, fallback) = (b("stream")?, b("fallback")?);
    let (fallback_from, fallback_reason) = (s("fallback_from")?, s("fallback_reason")?);
    let attempts = col("attempts")?
        .as_list_opt::<i32>()
        .ok_or_else(|| ArrowError::SchemaError("attempts: not a list".into()))?;
    let attempt_values = attempts.values().as_struct();
    let attempt_rows = read_attempts(attempt_values)?;
    let (status, outcome, error_type) = (i32c("status")?, s("outcome")?, s("error_type")?);
    let (input, cached, output, reasoning) = (
        i("input_tokens")?,
        i("cached_input_tokens")?,
        i("output_tokens")?,
        i("reasoning_tokens")?,
    );
    let (token_source, cache, cache_kind) = (s("token_source")?, s("cache")?, s("cache_kind")?);
    let (cost, saved) = (money("cost_usd")?, money("cost_saved_usd")?);
    let price_version = s("price_version")?;
    let rate_limited = b("rate_limited")?;
    let limit_key = s("limit_key")?;

    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    let opt_u =
        |a: &arrow_array::PrimitiveArray<Int64Type>, r: usize| a.is_valid(r).then(|| u(a.value(r)));
    let usd = |a: &arrow_array::PrimitiveArray<Decimal128Type>, r: usize| {
        if a.is_valid(r) {
            Usd::from_scaled(a.value(r))
        } else {
            None
        }
    };
    let mut out = Vec::with_capacity(batch.num_rows());
    for r in 0..batch.num_rows() {
        let bad = |what: &str| ArrowError::InvalidArgumentError(format!("row {r}: {what}"));
        let event_id = Uuid::from_slice(ids.value(r)).map_err(|_| bad("event_id"))?;
        let mut row_tags = BTreeMap::new();
        let offsets = tags.value_offsets();
        for t in offsets[r] as usize..offsets[r + 1] as usize {
            if let Some(k) = tag_keys.get(t) {
                row_tags.insert(k, tag_values.get(t).unwrap_or_default());
            }
        }
        let aoff = attempts.value_offsets();
        let row_attempts = attempt_rows[aoff[r] as usize..aoff[r + 1] as usize].to_vec();
        out.push(UsageEvent {
            event_id,
            schema_version: u16::try_from(version.value(r)).map_err(|_| bad("schema_version"))?,
            request_id: request_id.get(r),
            trace_id: trace_id.get(r),
            gateway_instance: instance.get(r).unwrap_or_default(),
            ts_start: DateTime::from_timestamp_micros(ts_start.value(r))
                .ok_or_else(|| bad("ts_start"))?,
            ts_end: DateTime::from_timestamp_micros(ts_end.value(r))
                .ok_or_else(|| bad("ts_end"))?,
            latency_ms: u(latency.value(r)),
            ttft_ms: opt_u(ttft, r),
            upstream_latency_ms: opt_u(upstream_latency, r),
            gateway_overhead_us: u(overhead.value(r)),
            consumer: consumer.get(r),
            team: team.get(r),
            api_key_id: key_id.get(r),
            client_ip: ip.get(r),
            tags: row_tags,
            endpoint: endpoint.get(r).unwrap_or_default(),
            requested_model: requested.get(r),
            served_model: served.get(r),
            provider: provider.get(r),
            upstream: upstream.get(r),
            stream: stream.value(r),
            fallback: fallback.value(r),
            fallback_from: fallback_from.get(r),
            fallback_reason: fallback_reason.get(r),
            attempts: row_attempts,
            status: u16::try_from(status.value(r)).map_err(|_| bad("status"))?,
            outcome: parse_enum::<Outcome>(outcome.get(r)).ok_or_else(|| bad("outcome"))?,
            error_type: error_type.get(r),
            input_tokens: u(input.value(r)),
            cached_input_tokens: u(cached.value(r)),
            output_tokens: u(output.value(r)),
            reasoning_tokens: u(reasoning.value(r)),
            token_source: parse_enum(token_source.get(r)),
            cache: parse_enum(cache.get(r)).ok_or_else(|| bad("cache"))?,
            cache_kind: parse_enum(cache_kind.get(r)),
            cost_usd: usd(cost, r),
            cost_saved_usd: usd(saved, r),
            price_version: price_version.get(r),
            rate_limited: rate_limited.value(r),
            limit_key: limit_key.get(r),
        });
    }
    Ok(out)
}

fn parse_enum<T: serde::de::DeserializeOwned>(s: Option<String>) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s?)).ok()
}

fn read_attempts(values: &StructArray) -> Result<Vec<Attempt>, ArrowError> {
    let col = |name: &str| -> Result<&ArrayRef, ArrowError> {
        values
            .column_by_name(name)
            .ok_or_else(|| ArrowError::SchemaError(format!("attempts: missing {name}")))
    };
    let s = |name: &str| Strs::new(col(name)?);
    let i = |name: &str| -> Result<&arrow_array::PrimitiveArray<Int64Type>, ArrowError> {
        col(name)?
            .as_primitive_opt::<Int64Type>()
            .ok_or_else(|| ArrowError::SchemaError(format!("attempts.{name}: not Int64")))
    };
    let (upstream, provider, model, error, source) = (
        s("upstream")?,
        s("provider")?,
        s("model")?,
        s("error")?,
        s("token_source")?,
    );
    let status = col("status")?
        .as_primitive_opt::<Int32Type>()
        .ok_or_else(|| ArrowError::SchemaError("attempts.status: not Int32".into()))?;
    let cost = col("cost_usd")?
        .as_primitive_opt::<Decimal128Type>()
        .ok_or_else(|| ArrowError::SchemaError("attempts.cost_usd: not Decimal128".into()))?;
    let (latency, input, cached, output, reasoning) = (
        i("latency_ms")?,
        i("input_tokens")?,
        i("cached_input_tokens")?,
        i("output_tokens")?,
        i("reasoning_tokens")?,
    );
    let u = |v: i64| u64::try_from(v).unwrap_or(0);
    Ok((0..values.len())
        .map(|r| Attempt {
            upstream: upstream.get(r).unwrap_or_default(),
            provider: provider.get(r).unwrap_or_default(),
            model: model.get(r).unwrap_or_default(),
            status: status
                .is_valid(r)
                .then(|| u16::try_from(status.value(r)).unwrap_or(0)),
            error: error.get(r),
            latency_ms: u(latency.value(r)),
            input_tokens: u(input.value(r)),
            cached_input_tokens: u(cached.value(r)),
            output_tokens: u(output.value(r)),
            reasoning_tokens: u(reasoning.value(r)),
            token_source: parse_enum(source.get(r)),
            cost_usd: if cost.is_valid(r) {
                Usd::from_scaled(cost.value(r))
            } else {
                None
            },
        })
        .collect())
}

/// A string column.
struct Strs<'a>(&'a arrow_array::StringArray);

impl<'a> Strs<'a> {
    fn new(a: &'a ArrayRef) -> Result<Self, ArrowError> {
        a.as_string_opt::<i32>().map(Strs).ok_or_else(|| {
            ArrowError::SchemaError(format!("expected a string column, found {}", a.data_type()))
        })
    }

    fn get(&self, r: usize) -> Option<String> {
        self.0.is_valid(r).then(|| self.0.value(r).to_string())
    }
}
