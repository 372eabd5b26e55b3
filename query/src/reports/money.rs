//! Money lines: the caller's rows in a window, summed per report keys,
//! priced model and day, ready to reprice with any catalog.

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::Date32Type;
use chrono::{DateTime, Duration, NaiveDate, TimeZone, Timelike, Utc};
use datafusion::common::ScalarValue;
use datafusion::dataframe::DataFrame;
use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::{Expr, col, lit};
use rust_decimal::Decimal;
use serde_json::{Map, Value};
use tollgate_lake::layout::PARTITION_COLUMNS;
use tollgate_schemas::{Price, PriceCatalog, Tokens};

use crate::engine::Engine;
use crate::reports::cells::{decimal_at, u64_at, usd, value_at};
use crate::reports::request::{Window, hour_start, model, next_hour};
use crate::{Principal, QueryError};

pub(crate) fn ts(t: DateTime<Utc>) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(
        Some(t.timestamp_micros()),
        Some("UTC".into()),
    ))
}

pub(crate) fn day_number(d: NaiveDate) -> i32 {
    (d - NaiveDate::default()).num_days() as i32
}

/// `(date, hour) >= t's hour` (`ge`) or `< t's hour`, on partition columns
/// alone, so DataFusion answers it from directory names.
pub(crate) fn partition_bound(t: DateTime<Utc>, ge: bool) -> Expr {
    let date = lit(ScalarValue::Date32(Some(day_number(t.date_naive()))));
    let hour = lit(t.hour() as i32);
    let [date_col, hour_col] = PARTITION_COLUMNS.map(col);
    let (beyond, edge) = if ge {
        (date_col.clone().gt(date.clone()), hour_col.gt_eq(hour))
    } else {
        (date_col.clone().lt(date.clone()), hour_col.lt(hour))
    };
    beyond.or(date_col.eq(date).and(edge))
}

/// Rows of the window. The lake's `date`/`hour` directories hold the hour
/// of `ts_start`, so whole hours are chosen by directory; only a window
/// edge inside an hour adds a row filter on `ts_start`.
pub(crate) fn in_window(w: &Window) -> Expr {
    let mut e = partition_bound(w.from, true).and(partition_bound(next_hour(w.to), false));
    if hour_start(w.from) != w.from {
        e = e.and(col("ts_start").gt_eq(ts(w.from)));
    }
    if hour_start(w.to) != w.to {
        e = e.and(col("ts_start").lt(ts(w.to)));
    }
    let only = &w.only;
    if let Some(c) = &only.consumer {
        e = e.and(col("consumer").eq(lit(c.as_str())));
    }
    if let Some(t) = &only.team {
        e = e.and(col("team").eq(lit(t.as_str())));
    }
    if let Some(m) = &only.model {
        let answered = datafusion::functions::expr_fn::coalesce(vec![
            col("served_model"),
            col("requested_model"),
        ]);
        e = e.and(answered.eq(lit(m.as_str())));
    }
    if let Some((k, v)) = &only.tag {
        use datafusion::functions_nested::expr_fn::{array_element, map_extract};
        let value = array_element(map_extract(col("tags"), lit(k.as_str())), lit(1i64));
        e = e.and(value.eq(lit(v.as_str())));
    }
    e
}

fn money_sum(c: &str) -> Expr {
    sum(col(c))
}

/// Per (groups, priced model, day): what repricing needs.
const MONEY: &[&str] = &[
    "requests",
    "input_tokens",
    "cached_input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cost_usd",
    "cost_saved_usd",
];

fn money_aggregates() -> Vec<Expr> {
    vec![
        count(lit(1)).alias("requests"),
        sum(col("input_tokens")).alias("input_tokens"),
        sum(col("cached_input_tokens")).alias("cached_input_tokens"),
        sum(col("output_tokens")).alias("output_tokens"),
        sum(col("reasoning_tokens")).alias("reasoning_tokens"),
        money_sum("cost_usd").alias("cost_usd"),
        money_sum("cost_saved_usd").alias("cost_saved_usd"),
    ]
}

/// One aggregated line: its keys as JSON, its counts and its money.
#[derive(Debug, Clone, Default)]
pub(crate) struct Line {
    pub(crate) keys: Vec<Value>,
    pub(crate) priced_model: Option<String>,
    pub(crate) day: Option<NaiveDate>,
    /// The hour of the day, for hourly reports.
    pub(crate) hour: Option<u32>,
    pub(crate) requests: u64,
    pub(crate) tokens: Tokens,
    pub(crate) reasoning: u64,
    pub(crate) cost: Decimal,
    pub(crate) saved: Decimal,
}

/// The aggregated lines of `money_lines`: the first `n_keys` columns are
/// the report's keys; the priced model is key `model_key` or its own column.
pub(crate) fn lines(batches: &[RecordBatch], n_keys: usize, model_key: Option<usize>) -> Vec<Line> {
    let mut out = Vec::new();
    for b in batches {
        let c = |name: &str| b.column_by_name(name).cloned();
        let model = match model_key {
            Some(k) => Some(b.column(k).clone()),
            None => c("priced_model"),
        };
        let (Some(model), Some(day)) = (model, c("day")) else {
            continue;
        };
        let hour = c("hour");
        let m: Vec<ArrayRef> = MONEY.iter().filter_map(|n| c(n)).collect();
        if m.len() != MONEY.len() {
            continue;
        }
        for row in 0..b.num_rows() {
            out.push(Line {
                keys: (0..n_keys).map(|k| value_at(b.column(k), row)).collect(),
                priced_model: match value_at(&model, row) {
                    Value::String(s) => Some(s),
                    _ => None,
                },
                day: (!day.is_null(row)).then(|| {
                    NaiveDate::default()
                        + Duration::days(day.as_primitive::<Date32Type>().value(row) as i64)
                }),
                hour: hour
                    .as_ref()
                    .filter(|h| h.is_valid(row))
                    .map(|h| u64_at(h, row) as u32),
                requests: u64_at(&m[0], row),
                tokens: Tokens {
                    input: u64_at(&m[1], row),
                    cached_input: u64_at(&m[2], row),
                    output: u64_at(&m[3], row),
                    reasoning: u64_at(&m[4], row),
                },
                reasoning: u64_at(&m[4], row),
                cost: decimal_at(&m[5], row),
                saved: decimal_at(&m[6], row),
            });
        }
    }
    out
}

pub(crate) fn at_noon(d: Option<NaiveDate>) -> DateTime<Utc> {
    Utc.from_utc_datetime(
        &d.unwrap_or_default()
            .and_hms_opt(12, 0, 0)
            .unwrap_or_default(),
    )
}

pub(crate) fn price<'a>(
    catalog: &'a PriceCatalog,
    model: &Option<String>,
    day: Option<NaiveDate>,
) -> Option<&'a Price> {
    catalog.price(model.as_deref()?, at_noon(day))
}

/// Sums that fold line by line into a report row and into the totals.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sums {
    pub(crate) requests: u64,
    pub(crate) tokens: Tokens,
    pub(crate) reasoning: u64,
    pub(crate) cost: Decimal,
    pub(crate) saved: Decimal,
}

impl Sums {
    pub(crate) fn add(&mut self, l: &Line, cost: Decimal) {
        self.requests += l.requests;
        self.tokens.input += l.tokens.input;
        self.tokens.cached_input += l.tokens.cached_input;
        self.tokens.output += l.tokens.output;
        self.reasoning += l.reasoning;
        self.cost += cost;
        self.saved += l.saved;
    }

    pub(crate) fn fill(&self, row: &mut Map<String, Value>) {
        row.insert("requests".into(), self.requests.into());
        row.insert("input_tokens".into(), self.tokens.input.into());
        row.insert(
            "cached_input_tokens".into(),
            self.tokens.cached_input.into(),
        );
        row.insert("output_tokens".into(), self.tokens.output.into());
        row.insert("reasoning_tokens".into(), self.reasoning.into());
        row.insert("cost_usd".into(), usd(self.cost));
    }
}

/// The line's cost: the ledger's own, or repriced with the chosen catalog.
pub(crate) fn line_cost(w: &Window, l: &Line, unpriced: &mut Vec<String>) -> Decimal {
    let Some(catalog) = &w.catalog else {
        return l.cost;
    };
    match price(catalog, &l.priced_model, l.day) {
        Some(p) => p.cost(&l.tokens).decimal(),
        None => {
            let name = l.priced_model.clone().unwrap_or_else(|| "(none)".into());
            if l.tokens.input + l.tokens.output > 0 && !unpriced.contains(&name) {
                unpriced.push(name);
            }
            Decimal::ZERO
        }
    }
}

/// The caller's `usage` rows in the window, and `extra` on top.
pub(crate) async fn window_rows(
    engine: &Engine,
    who: &Principal,
    w: &Window,
    extra: Option<Expr>,
) -> Result<DataFrame, QueryError> {
    let df = |e| QueryError::from_datafusion(e);
    let ctx = engine.session(who).await?;
    let filter = match extra {
        Some(e) => in_window(w).and(e),
        None => in_window(w),
    };
    ctx.table("usage")
        .await
        .map_err(df)?
        .filter(filter)
        .map_err(df)
}

/// Money per `keys`, priced model and day (and hour when `hourly`), as
/// lines ready to reprice. `model_key` names the key that already is the
/// priced model, so it is not grouped on twice.
pub(crate) async fn money_lines(
    engine: &Engine,
    who: &Principal,
    w: &Window,
    mut keys: Vec<Expr>,
    model_key: Option<usize>,
    hourly: bool,
) -> Result<Vec<Line>, QueryError> {
    let n_keys = keys.len();
    if model_key.is_none() {
        keys.push(model().alias("priced_model"));
    }
    // The partition columns: constant per file, so grouping on them is
    // cheaper than truncating `ts_start` row by row.
    let [date_col, hour_col] = PARTITION_COLUMNS;
    keys.push(col(date_col).alias("day"));
    if hourly {
        keys.push(col(hour_col));
    }
    let frame = window_rows(engine, who, w, None)
        .await?
        .aggregate(keys, money_aggregates())
        .map_err(QueryError::from_datafusion)?;
    let out = engine.run_frame(frame).await?;
    Ok(lines(&out.batches, n_keys, model_key))
}
