//! Reading result cells and writing report cells: text, counts and exact
//! money out of Arrow arrays; money, rates and ratios as JSON.

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Decimal128Type, Int64Type};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Map, Value};
use tollgate_schemas::Usd;

#[derive(Serialize)]
pub struct Report {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    #[serde(flatten)]
    pub params: Map<String, Value>,
    pub rows: Vec<Value>,
    pub totals: Value,
    /// Models the chosen catalog has no price for (their cost counts as 0).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub unpriced_models: Vec<String>,
}

pub(crate) fn value_at(a: &ArrayRef, row: usize) -> Value {
    if a.is_null(row) {
        return Value::Null;
    }
    match a.data_type() {
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(row).to_string()),
        DataType::Utf8View => Value::String(a.as_string_view().value(row).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(row).to_string()),
        _ => arrow::util::display::array_value_to_string(a, row).map_or(Value::Null, Value::String),
    }
}

pub(crate) fn u64_at(a: &ArrayRef, row: usize) -> u64 {
    if a.is_null(row) {
        return 0;
    }
    match a.data_type() {
        DataType::Int64 => a.as_primitive::<Int64Type>().value(row).max(0) as u64,
        DataType::UInt64 => a.as_primitive::<arrow::datatypes::UInt64Type>().value(row),
        DataType::Int32 => a
            .as_primitive::<arrow::datatypes::Int32Type>()
            .value(row)
            .max(0) as u64,
        _ => arrow::compute::cast(a, &DataType::Int64)
            .map(|c| c.as_primitive::<Int64Type>().value(row).max(0) as u64)
            .unwrap_or(0),
    }
}

pub(crate) fn decimal_at(a: &ArrayRef, row: usize) -> Decimal {
    if a.is_null(row) {
        return Decimal::ZERO;
    }
    match a.data_type() {
        DataType::Decimal128(_, scale) => {
            let v = a.as_primitive::<Decimal128Type>().value(row);
            Decimal::try_from_i128_with_scale(v, *scale as u32).unwrap_or(Decimal::MAX)
        }
        _ => Decimal::ZERO,
    }
}

/// A text cell, empty for null.
pub(crate) fn text_at(b: &RecordBatch, col: usize, row: usize) -> String {
    match value_at(b.column(col), row) {
        Value::String(s) => s,
        _ => String::new(),
    }
}

pub(crate) fn usd(d: Decimal) -> Value {
    Value::String(Usd(d).decimal().normalize().to_string())
}

pub(crate) fn rate(part: u64, whole: u64) -> Value {
    if whole == 0 {
        Value::Null
    } else {
        serde_json::json!(part as f64 / whole as f64)
    }
}

pub(crate) fn ratio(part: Decimal, whole: Decimal) -> Value {
    if whole.is_zero() {
        return Value::Null;
    }
    serde_json::json!(
        (part / whole)
            .round_dp(6)
            .to_string()
            .parse::<f64>()
            .unwrap_or(0.0)
    )
}
