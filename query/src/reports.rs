//! The cost and ROI reports: fixed queries built with DataFusion's
//! DataFrame API in the caller's own session (so a consumer's report only
//! covers its rows), with money summed as exact decimals.
//!
//! Money is aggregated per (report row, priced model, day) in SQL; the
//! price in force that day is applied here, so any window can be repriced
//! against another catalog (`catalog=`) or another model (`reprice=`).

use std::collections::BTreeMap;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Date32Type, Decimal128Type, Int64Type};
use chrono::{DateTime, Datelike, Duration, DurationRound, NaiveDate, TimeZone, Timelike, Utc};
use datafusion::common::ScalarValue;
use datafusion::dataframe::DataFrame;
use datafusion::functions::core::expr_fn::get_field;
use datafusion::functions::expr_fn::coalesce;
use datafusion::functions::math::expr_fn::{ln, round};
use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::{Expr, SortExpr, cast, col, lit, when};
use rust_decimal::Decimal;
use serde::Serialize;
use serde_json::{Map, Value};
use tollgate_schemas::{Price, PriceCatalog, Tokens, Usd};

use crate::engine::Engine;
use crate::{Principal, QueryError};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Group {
    Consumer,
    Team,
    Model,
    Tag(String),
}

impl Group {
    fn name(&self) -> String {
        match self {
            Group::Consumer => "consumer".into(),
            Group::Team => "team".into(),
            Group::Model => "model".into(),
            Group::Tag(k) => format!("tag:{k}"),
        }
    }

    fn expr(&self, alias: &str) -> Expr {
        match self {
            Group::Consumer => col("consumer"),
            Group::Team => col("team"),
            Group::Model => model(),
            Group::Tag(k) => get_field(col("tags"), k.as_str()),
        }
        .alias(alias)
    }
}

/// The model that did the work: the served one, else the requested one.
fn model() -> Expr {
    coalesce(vec![col("served_model"), col("requested_model")])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
    Month,
}

/// The window and catalog every report takes.
#[derive(Debug, Clone)]
pub struct Window {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The catalog to price with; `None` keeps each event's own cost.
    pub catalog: Option<PriceCatalog>,
}

#[derive(Debug, Clone)]
pub struct CostRequest {
    pub window: Window,
    pub group_by: Vec<Group>,
    pub granularity: Granularity,
}

#[derive(Debug, Clone)]
pub struct Reprice {
    pub from: String,
    pub to: String,
}

#[derive(Debug, Clone)]
pub struct SelfHost {
    pub gpu_hour_usd: Decimal,
    pub gpus: u32,
    pub tokens_per_s: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct RoiRequest {
    pub window: Window,
    pub reprice: Vec<Reprice>,
    pub self_host: Option<SelfHost>,
}

fn bad(m: impl Into<String>) -> QueryError {
    QueryError::BadRequest(m.into())
}

fn parse_time(key: &str, v: &str) -> Result<DateTime<Utc>, QueryError> {
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(v, "%Y-%m-%d") {
        return Ok(Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default()));
    }
    Err(bad(format!(
        "{key}={v:?} is not a date (2026-11-01) or an RFC 3339 time (2026-11-01T00:00:00Z)"
    )))
}

fn window(
    params: &[(String, String)],
    catalogs: &[PriceCatalog],
    known: &[&str],
) -> Result<Window, QueryError> {
    let mut from = None;
    let mut to = None;
    let mut catalog = None;
    for (k, v) in params {
        match k.as_str() {
            "from" => from = Some(parse_time(k, v)?),
            "to" => to = Some(parse_time(k, v)?),
            "catalog" => {
                let c = catalogs.iter().find(|c| c.version() == v).ok_or_else(|| {
                    let versions: Vec<&str> = catalogs.iter().map(|c| c.version()).collect();
                    bad(format!(
                        "catalog={v:?} is not loaded; loaded versions: {versions:?}"
                    ))
                })?;
                catalog = Some(c.clone());
            }
            k if known.contains(&k) => {}
            other => return Err(bad(format!("unknown parameter {other:?}"))),
        }
    }
    // By default the last 30 days through the current hour: whole hours,
    // so the lake's hour directories select the rows on their own.
    let to = to.unwrap_or_else(|| next_hour(Utc::now()));
    let from = from.unwrap_or(to - Duration::days(30));
    if from >= to {
        return Err(bad("from must be before to"));
    }
    Ok(Window { from, to, catalog })
}

impl CostRequest {
    pub fn parse(
        params: &[(String, String)],
        catalogs: &[PriceCatalog],
    ) -> Result<Self, QueryError> {
        let window = window(params, catalogs, &["group_by", "granularity"])?;
        let mut group_by = vec![Group::Consumer, Group::Model];
        let mut granularity = Granularity::Day;
        for (k, v) in params {
            match k.as_str() {
                "group_by" => {
                    group_by = Vec::new();
                    for g in v.split(',').map(str::trim).filter(|g| !g.is_empty()) {
                        let group = match g {
                            "consumer" => Group::Consumer,
                            "team" => Group::Team,
                            "model" => Group::Model,
                            t => match t.strip_prefix("tag:") {
                                Some(key) if !key.is_empty() => Group::Tag(key.to_string()),
                                _ => {
                                    return Err(bad(format!(
                                        "group_by {g:?}: choose from consumer, team, model, tag:<key>"
                                    )));
                                }
                            },
                        };
                        if group_by.contains(&group) {
                            return Err(bad(format!("group_by names {g:?} twice")));
                        }
                        group_by.push(group);
                    }
                }
                "granularity" => {
                    granularity = match v.as_str() {
                        "hour" => Granularity::Hour,
                        "day" => Granularity::Day,
                        "month" => Granularity::Month,
                        _ => {
                            return Err(bad(format!(
                                "granularity={v:?}: choose hour, day or month"
                            )));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(Self {
            window,
            group_by,
            granularity,
        })
    }
}

impl RoiRequest {
    pub fn parse(
        params: &[(String, String)],
        catalogs: &[PriceCatalog],
    ) -> Result<Self, QueryError> {
        let window = window(
            params,
            catalogs,
            &["reprice", "gpu_hour_usd", "gpus", "tokens_per_s"],
        )?;
        let mut reprice = Vec::new();
        let mut gpu_hour_usd = None;
        let mut gpus = 1u32;
        let mut tokens_per_s = None;
        for (k, v) in params {
            match k.as_str() {
                "reprice" => {
                    for pair in v.split(',').filter(|p| !p.is_empty()) {
                        let (from, to) = pair.split_once(':').ok_or_else(|| {
                            bad(format!("reprice={pair:?}: write <model>:<other model>"))
                        })?;
                        reprice.push(Reprice {
                            from: from.trim().to_string(),
                            to: to.trim().to_string(),
                        });
                    }
                }
                "gpu_hour_usd" => {
                    let d: Decimal = v
                        .parse()
                        .map_err(|_| bad(format!("gpu_hour_usd={v:?} is not a number")))?;
                    if d <= Decimal::ZERO {
                        return Err(bad("gpu_hour_usd must be positive"));
                    }
                    gpu_hour_usd = Some(d);
                }
                "gpus" => {
                    gpus = v
                        .parse()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| bad(format!("gpus={v:?} is not a positive integer")))?;
                }
                "tokens_per_s" => {
                    let t: f64 = v
                        .parse()
                        .ok()
                        .filter(|t: &f64| t.is_finite() && *t > 0.0)
                        .ok_or_else(|| {
                            bad(format!("tokens_per_s={v:?} is not a positive number"))
                        })?;
                    tokens_per_s = Some(t);
                }
                _ => {}
            }
        }
        let price_of = |m: &str| catalogs.first().and_then(|c| c.price(m, window.to));
        for r in &reprice {
            if price_of(&r.to).is_none() {
                return Err(bad(format!(
                    "reprice: the catalog has no price for {:?}",
                    r.to
                )));
            }
        }
        let self_host = match (gpu_hour_usd, tokens_per_s) {
            (Some(gpu_hour_usd), tokens_per_s) => Some(SelfHost {
                gpu_hour_usd,
                gpus,
                tokens_per_s,
            }),
            (None, Some(_)) => return Err(bad("tokens_per_s needs gpu_hour_usd")),
            (None, None) => None,
        };
        Ok(Self {
            window,
            reprice,
            self_host,
        })
    }
}

// ------------------------------------------------------------------ running

fn ts(t: DateTime<Utc>) -> Expr {
    lit(ScalarValue::TimestampMicrosecond(
        Some(t.timestamp_micros()),
        Some("UTC".into()),
    ))
}

fn day_number(d: NaiveDate) -> i32 {
    (d - NaiveDate::default()).num_days() as i32
}

fn hour_start(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::hours(1)).unwrap_or(t)
}

fn next_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    let start = hour_start(t);
    if start == t {
        t
    } else {
        start + Duration::hours(1)
    }
}

/// `(date, hour) >= t's hour` (`ge`) or `< t's hour`, on partition columns
/// alone, so DataFusion answers it from directory names.
fn partition_bound(t: DateTime<Utc>, ge: bool) -> Expr {
    let date = lit(ScalarValue::Date32(Some(day_number(t.date_naive()))));
    let hour = lit(t.hour() as i32);
    let (beyond, edge) = if ge {
        (col("date").gt(date.clone()), col("hour").gt_eq(hour))
    } else {
        (col("date").lt(date.clone()), col("hour").lt(hour))
    };
    beyond.or(col("date").eq(date).and(edge))
}

/// Rows of the window. The lake's `date`/`hour` directories hold the hour
/// of `ts_start`, so whole hours are chosen by directory; only a window
/// edge inside an hour adds a row filter on `ts_start`.
fn in_window(w: &Window) -> Expr {
    let mut e = partition_bound(w.from, true).and(partition_bound(next_hour(w.to), false));
    if hour_start(w.from) != w.from {
        e = e.and(col("ts_start").gt_eq(ts(w.from)));
    }
    if hour_start(w.to) != w.to {
        e = e.and(col("ts_start").lt(ts(w.to)));
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
struct Line {
    keys: Vec<Value>,
    priced_model: Option<String>,
    day: Option<NaiveDate>,
    /// The hour of the day, for hourly reports.
    hour: Option<u32>,
    requests: u64,
    tokens: Tokens,
    reasoning: u64,
    cost: Decimal,
    saved: Decimal,
}

fn value_at(a: &ArrayRef, row: usize) -> Value {
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

fn u64_at(a: &ArrayRef, row: usize) -> u64 {
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

fn decimal_at(a: &ArrayRef, row: usize) -> Decimal {
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

/// The aggregated lines of `money_lines`: the first `n_keys` columns are
/// the report's keys; the priced model is key `model_key` or its own column.
fn lines(batches: &[RecordBatch], n_keys: usize, model_key: Option<usize>) -> Vec<Line> {
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

fn at_noon(d: Option<NaiveDate>) -> DateTime<Utc> {
    Utc.from_utc_datetime(
        &d.unwrap_or_default()
            .and_hms_opt(12, 0, 0)
            .unwrap_or_default(),
    )
}

fn price<'a>(
    catalog: &'a PriceCatalog,
    model: &Option<String>,
    day: Option<NaiveDate>,
) -> Option<&'a Price> {
    catalog.price(model.as_deref()?, at_noon(day))
}

fn usd(d: Decimal) -> Value {
    Value::String(Usd(d).decimal().normalize().to_string())
}

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

/// Sums that fold line by line into a report row and into the totals.
#[derive(Debug, Clone, Default)]
struct Sums {
    requests: u64,
    tokens: Tokens,
    reasoning: u64,
    cost: Decimal,
    saved: Decimal,
}

impl Sums {
    fn add(&mut self, l: &Line, cost: Decimal) {
        self.requests += l.requests;
        self.tokens.input += l.tokens.input;
        self.tokens.cached_input += l.tokens.cached_input;
        self.tokens.output += l.tokens.output;
        self.reasoning += l.reasoning;
        self.cost += cost;
        self.saved += l.saved;
    }

    fn fill(&self, row: &mut Map<String, Value>) {
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
fn line_cost(w: &Window, l: &Line, unpriced: &mut Vec<String>) -> Decimal {
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
async fn window_rows(
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
async fn money_lines(
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
    keys.push(col("date").alias("day"));
    if hourly {
        keys.push(col("hour"));
    }
    let frame = window_rows(engine, who, w, None)
        .await?
        .aggregate(keys, money_aggregates())
        .map_err(QueryError::from_datafusion)?;
    let out = engine.run_frame(frame).await?;
    Ok(lines(&out.batches, n_keys, model_key))
}

/// A text cell, empty for null.
fn text_at(b: &RecordBatch, col: usize, row: usize) -> String {
    match value_at(b.column(col), row) {
        Value::String(s) => s,
        _ => String::new(),
    }
}

/// The start of the line's period, as RFC 3339 in UTC.
fn period(g: Granularity, l: &Line) -> Value {
    let Some(day) = l.day else {
        return Value::Null;
    };
    let (day, hour) = match g {
        Granularity::Hour => (day, l.hour.unwrap_or(0)),
        Granularity::Day => (day, 0),
        Granularity::Month => (day.with_day(1).unwrap_or(day), 0),
    };
    Value::String(format!("{}T{hour:02}:00:00Z", day.format("%Y-%m-%d")))
}

pub async fn cost(engine: &Engine, who: &Principal, r: &CostRequest) -> Result<Report, QueryError> {
    let unit = match r.granularity {
        Granularity::Hour => "hour",
        Granularity::Day => "day",
        Granularity::Month => "month",
    };
    let keys = r
        .group_by
        .iter()
        .enumerate()
        .map(|(i, g)| g.expr(&format!("g{i}")))
        .collect();
    let model_key = r.group_by.iter().position(|g| *g == Group::Model);
    let hourly = r.granularity == Granularity::Hour;
    let lines = money_lines(engine, who, &r.window, keys, model_key, hourly).await?;
    let mut unpriced = Vec::new();
    let mut rows: BTreeMap<String, (Vec<Value>, Sums)> = BTreeMap::new();
    let mut totals = Sums::default();
    for l in lines {
        let cost = line_cost(&r.window, &l, &mut unpriced);
        totals.add(&l, cost);
        let mut keys = Vec::with_capacity(l.keys.len() + 1);
        keys.push(period(r.granularity, &l));
        keys.extend(l.keys.iter().cloned());
        let key = serde_json::to_string(&keys).unwrap_or_default();
        rows.entry(key)
            .or_insert_with(|| (keys, Sums::default()))
            .1
            .add(&l, cost);
    }
    let rows = rows
        .into_values()
        .map(|(keys, sums)| {
            let mut row = Map::new();
            row.insert(
                "period".into(),
                keys.first().cloned().unwrap_or(Value::Null),
            );
            for (g, v) in r.group_by.iter().zip(keys.iter().skip(1)) {
                row.insert(g.name(), v.clone());
            }
            sums.fill(&mut row);
            Value::Object(row)
        })
        .collect();
    let mut t = Map::new();
    totals.fill(&mut t);
    let mut params = Map::new();
    params.insert("granularity".into(), unit.into());
    params.insert(
        "group_by".into(),
        Value::Array(r.group_by.iter().map(|g| Value::String(g.name())).collect()),
    );
    params.insert(
        "catalog".into(),
        r.window
            .catalog
            .as_ref()
            .map_or(Value::Null, |c| c.version().into()),
    );
    Ok(Report {
        from: r.window.from,
        to: r.window.to,
        params,
        rows,
        totals: Value::Object(t),
        unpriced_models: unpriced,
    })
}

// ---------------------------------------------------------------------- ROI

fn rate(part: u64, whole: u64) -> Value {
    if whole == 0 {
        Value::Null
    } else {
        serde_json::json!(part as f64 / whole as f64)
    }
}

fn ratio(part: Decimal, whole: Decimal) -> Value {
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

/// Buckets per e-fold of a latency: neighbouring buckets differ by 1.6%,
/// so a percentile read from them is within 0.8% of the value.
const BUCKETS_PER_E: f64 = 64.0;

/// The log-scale bucket of a millisecond count.
fn bucket(ms: Expr) -> Expr {
    cast(
        round(vec![
            ln(cast(ms, DataType::Float64) + lit(1.0)) * lit(BUCKETS_PER_E),
        ]),
        DataType::Int32,
    )
}

/// The `q` quantile of a histogram of (bucket, count), in milliseconds.
fn quantile(hist: &mut [(i32, u64)], q: f64) -> Option<f64> {
    hist.sort_unstable();
    let n: u64 = hist.iter().map(|(_, c)| c).sum();
    let rank = ((q * n as f64).ceil() as u64).max(1);
    let mut seen = 0;
    hist.iter().find_map(|&(b, c)| {
        seen += c;
        (seen >= rank).then(|| ((b as f64 / BUCKETS_PER_E).exp() - 1.0).max(0.0).round())
    })
}

#[derive(Default)]
struct Stats {
    errors: u64,
    fallbacks: u64,
    cache_hits: u64,
    decode_tokens: u64,
    decode_ms: u64,
    latency: Vec<(i32, u64)>,
    ttft: Vec<(i32, u64)>,
}

/// Folds rows of (consumer, model, bucket, count, ...) into `acc`: the
/// bucket counts into the histogram `pick` chooses, the rest by `more`.
fn fold_histogram(
    acc: &mut BTreeMap<(String, String), Stats>,
    batches: &[RecordBatch],
    pick: fn(&mut Stats) -> &mut Vec<(i32, u64)>,
    mut more: impl FnMut(&mut Stats, &RecordBatch, usize),
) {
    for b in batches {
        for row in 0..b.num_rows() {
            let s = acc
                .entry((text_at(b, 0, row), text_at(b, 1, row)))
                .or_default();
            if b.column(2).is_valid(row) {
                pick(s).push((u64_at(b.column(2), row) as i32, u64_at(b.column(3), row)));
            }
            more(s, b, row);
        }
    }
}

/// Stats per (consumer, requested model) that do not reprice: rates,
/// percentiles, throughput. Percentiles come from log-scale histograms the
/// engine counts (a hash on small integers), not from a sketch per group.
async fn roi_stats(
    engine: &Engine,
    who: &Principal,
    w: &Window,
) -> Result<BTreeMap<(String, String), Map<String, Value>>, QueryError> {
    let df = |e| QueryError::from_datafusion(e);
    let flag = |e: Expr| when(e, lit(1i64)).otherwise(lit(0i64)).map_err(df);
    let ok = col("status")
        .lt(lit(400))
        .and(col("output_tokens").gt(lit(0i64)));
    let decode_ms = col("latency_ms") - coalesce(vec![col("ttft_ms"), lit(0i64)]);
    let who_keys = || {
        vec![
            coalesce(vec![col("consumer"), lit("")]).alias("consumer"),
            coalesce(vec![col("requested_model"), lit("")]).alias("model"),
        ]
    };
    let mut keys = who_keys();
    keys.push(bucket(col("latency_ms")).alias("b"));
    let frame = window_rows(engine, who, w, None)
        .await?
        .aggregate(
            keys,
            vec![
                count(lit(1)).alias("n"),
                sum(flag(col("status").gt_eq(lit(400)))?).alias("errors"),
                sum(flag(col("fallback"))?).alias("fallbacks"),
                sum(flag(col("cache").eq(lit("hit")))?).alias("cache_hits"),
                sum(when(ok.clone(), col("output_tokens"))
                    .otherwise(lit(0i64))
                    .map_err(df)?)
                .alias("decode_tokens"),
                sum(when(ok, cast(decode_ms, DataType::Int64))
                    .otherwise(lit(0i64))
                    .map_err(df)?)
                .alias("decode_ms"),
            ],
        )
        .map_err(df)?;
    let out = engine.run_frame(frame).await?;
    let mut acc: BTreeMap<(String, String), Stats> = BTreeMap::new();
    fold_histogram(
        &mut acc,
        &out.batches,
        |s| &mut s.latency,
        |s, b, row| {
            s.errors += u64_at(b.column(4), row);
            s.fallbacks += u64_at(b.column(5), row);
            s.cache_hits += u64_at(b.column(6), row);
            s.decode_tokens += u64_at(b.column(7), row);
            s.decode_ms += u64_at(b.column(8), row);
        },
    );
    let mut keys = who_keys();
    keys.push(bucket(col("ttft_ms")).alias("b"));
    let frame = window_rows(engine, who, w, Some(col("ttft_ms").is_not_null()))
        .await?
        .aggregate(keys, vec![count(lit(1)).alias("n")])
        .map_err(df)?;
    let out = engine.run_frame(frame).await?;
    fold_histogram(&mut acc, &out.batches, |s| &mut s.ttft, |_, _, _| {});
    let json = |v: Option<f64>| v.map_or(Value::Null, |v| serde_json::json!(v));
    let mut stats = BTreeMap::new();
    for (k, mut s) in acc {
        let mut m = Map::new();
        m.insert("errors".into(), s.errors.into());
        m.insert("fallbacks".into(), s.fallbacks.into());
        m.insert("cache_hits".into(), s.cache_hits.into());
        m.insert("latency_p50_ms".into(), json(quantile(&mut s.latency, 0.5)));
        m.insert(
            "latency_p95_ms".into(),
            json(quantile(&mut s.latency, 0.95)),
        );
        m.insert("ttft_p50_ms".into(), json(quantile(&mut s.ttft, 0.5)));
        m.insert("ttft_p95_ms".into(), json(quantile(&mut s.ttft, 0.95)));
        m.insert(
            "output_tokens_per_s".into(),
            json((s.decode_ms > 0).then(|| s.decode_tokens as f64 * 1000.0 / s.decode_ms as f64)),
        );
        stats.insert(k, m);
    }
    // Fallback reasons, counted per row.
    let frame = window_rows(engine, who, w, Some(col("fallback")))
        .await?
        .aggregate(
            vec![
                coalesce(vec![col("consumer"), lit("")]).alias("consumer"),
                coalesce(vec![col("requested_model"), lit("")]).alias("model"),
                coalesce(vec![col("fallback_reason"), lit("unknown")]).alias("reason"),
            ],
            vec![count(lit(1)).alias("n")],
        )
        .map_err(df)?
        .sort(vec![SortExpr::new(col("reason"), true, false)])
        .map_err(df)?;
    let out = engine.run_frame(frame).await?;
    for b in &out.batches {
        for row in 0..b.num_rows() {
            let s = |i: usize| text_at(b, i, row);
            let m = stats.entry((s(0), s(1))).or_default();
            let reasons = m
                .entry("fallback_reasons")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(r) = reasons {
                r.insert(s(2), u64_at(b.column(3), row).into());
            }
        }
    }
    Ok(stats)
}

/// The monthly hours a rented GPU is billed for.
const HOURS_PER_MONTH: i64 = 730;

pub async fn roi(engine: &Engine, who: &Principal, r: &RoiRequest) -> Result<Report, QueryError> {
    let catalog = r
        .window
        .catalog
        .clone()
        .or_else(|| engine.catalogs().first().cloned())
        .ok_or_else(|| QueryError::Internal("no price catalog is loaded".into()))?;
    let keys = vec![
        coalesce(vec![col("consumer"), lit("")]).alias("consumer"),
        coalesce(vec![col("requested_model"), lit("")]).alias("model"),
    ];
    let lines = money_lines(engine, who, &r.window, keys, None, false).await?;
    let mut stats = roi_stats(engine, who, &r.window).await?;
    let mut unpriced = Vec::new();

    #[derive(Default)]
    struct Acc {
        sums: Sums,
        output_cost: Decimal,
        thinking: Decimal,
        repriced: Option<(String, Decimal)>,
    }
    let same = |a: &str, b: &str| {
        let at = r.window.to;
        match (catalog.price(a, at), catalog.price(b, at)) {
            (Some(x), Some(y)) => x.model == y.model,
            _ => a.eq_ignore_ascii_case(b),
        }
    };
    let mut rows: BTreeMap<(String, String), Acc> = BTreeMap::new();
    let mut total = Acc::default();
    let mut repriced_total: Option<(Decimal, Decimal, u64)> = None;
    for l in lines {
        let key = |i: usize| match &l.keys[i] {
            Value::String(s) => s.clone(),
            _ => String::new(),
        };
        let cost = line_cost(&r.window, &l, &mut unpriced);
        let p = price(&catalog, &l.priced_model, l.day);
        let out_cost = p.map_or(Decimal::ZERO, |p| {
            Usd::for_tokens(l.tokens.output, p.output.decimal()).decimal()
        });
        let thinking = p.map_or(Decimal::ZERO, |p| {
            Usd::for_tokens(l.reasoning, p.output.decimal()).decimal()
        });
        let acc = rows.entry((key(0), key(1))).or_default();
        for a in [&mut *acc, &mut total] {
            a.sums.add(&l, cost);
            a.output_cost += out_cost;
            a.thinking += thinking;
        }
        let target = r.reprice.iter().find(|rp| {
            same(&key(1), &rp.from) || l.priced_model.as_deref().is_some_and(|m| same(m, &rp.from))
        });
        if let Some(rp) = target {
            let alt = catalog
                .price(&rp.to, at_noon(l.day))
                .map_or(Decimal::ZERO, |p| p.cost(&l.tokens).decimal());
            let e = acc
                .repriced
                .get_or_insert_with(|| (rp.to.clone(), Decimal::ZERO));
            e.1 += alt;
            let t = repriced_total.get_or_insert((Decimal::ZERO, Decimal::ZERO, 0));
            t.0 += cost;
            t.1 += alt;
            t.2 += l.tokens.output;
        }
    }
    let window_hours =
        Decimal::from((r.window.to - r.window.from).num_seconds().max(1)) / Decimal::from(3600);
    let month_scale = Decimal::from(HOURS_PER_MONTH) / window_hours;
    let describe = |a: &Acc, stats: Option<&Map<String, Value>>| {
        let mut row = Map::new();
        a.sums.fill(&mut row);
        let n = a.sums.requests;
        if let Some(s) = stats {
            let get = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
            row.insert("error_rate".into(), rate(get("errors"), n));
            row.insert("fallback_rate".into(), rate(get("fallbacks"), n));
            row.insert(
                "fallback_reasons".into(),
                s.get("fallback_reasons")
                    .cloned()
                    .unwrap_or(Value::Object(Map::new())),
            );
            row.insert("cache_hit_rate".into(), rate(get("cache_hits"), n));
            for k in [
                "latency_p50_ms",
                "latency_p95_ms",
                "ttft_p50_ms",
                "ttft_p95_ms",
                "output_tokens_per_s",
            ] {
                row.insert(k.into(), s.get(k).cloned().unwrap_or(Value::Null));
            }
        }
        row.insert("cache_saved_usd".into(), usd(a.sums.saved));
        row.insert(
            "cost_per_1k_requests_usd".into(),
            if n == 0 {
                Value::Null
            } else {
                usd((a.sums.cost * Decimal::from(1000) / Decimal::from(n)).round_dp(Usd::SCALE))
            },
        );
        row.insert("output_cost_usd".into(), usd(a.output_cost));
        row.insert("thinking_tax_usd".into(), usd(a.thinking));
        row.insert(
            "thinking_share_of_output_cost".into(),
            ratio(a.thinking, a.output_cost),
        );
        row.insert(
            "thinking_share_of_cost".into(),
            ratio(a.thinking, a.sums.cost),
        );
        if let Some((to, alt)) = &a.repriced {
            row.insert(
                "repriced".into(),
                serde_json::json!({
                    "model": to,
                    "cost_usd": usd(*alt),
                    "saving_usd": usd(a.sums.cost - *alt),
                    "ratio": ratio(*alt, a.sums.cost),
                }),
            );
        }
        row
    };
    let out_rows: Vec<Value> = rows
        .iter()
        .map(|((consumer, model), a)| {
            let mut row = Map::new();
            row.insert("consumer".into(), consumer.clone().into());
            row.insert("model".into(), model.clone().into());
            row.extend(describe(a, stats.get(&(consumer.clone(), model.clone()))));
            Value::Object(row)
        })
        .collect();
    // Totals: rates over every row.
    let mut all = Map::new();
    for s in stats.values_mut() {
        for k in ["errors", "fallbacks", "cache_hits"] {
            let v = s.get(k).and_then(Value::as_u64).unwrap_or(0)
                + all.get(k).and_then(Value::as_u64).unwrap_or(0);
            all.insert(k.into(), v.into());
        }
    }
    let mut totals = describe(&total, Some(&all));
    for k in [
        "latency_p50_ms",
        "latency_p95_ms",
        "ttft_p50_ms",
        "ttft_p95_ms",
        "output_tokens_per_s",
        "fallback_reasons",
    ] {
        totals.remove(k);
    }

    let mut params = Map::new();
    params.insert("catalog".into(), catalog.version().into());
    params.insert(
        "reprice".into(),
        Value::Array(
            r.reprice
                .iter()
                .map(|p| Value::String(format!("{}:{}", p.from, p.to)))
                .collect(),
        ),
    );
    if let Some(sh) = &r.self_host {
        let (api_cost, output_tokens) = match repriced_total {
            Some((cost, _, out)) => (cost, out),
            None => (total.sums.cost, total.sums.tokens.output),
        };
        let measured = r.reprice.first().and_then(|rp| {
            stats
                .iter()
                .filter(|((_, m), _)| same(m, &rp.to))
                .find_map(|(_, s)| s.get("output_tokens_per_s").and_then(Value::as_f64))
        });
        let (tps, source) = match (sh.tokens_per_s, measured) {
            (Some(t), _) => (Some(t), "given"),
            (None, Some(t)) => (
                Some(t),
                "measured (single-stream output tokens/s of the target model in this window)",
            ),
            (None, None) => (None, "unknown: pass tokens_per_s"),
        };
        let gpu_hour_total = sh.gpu_hour_usd * Decimal::from(sh.gpus);
        let monthly_gpu = gpu_hour_total * Decimal::from(HOURS_PER_MONTH);
        let mut s = Map::new();
        s.insert("gpu_hour_usd".into(), usd(sh.gpu_hour_usd));
        s.insert("gpus".into(), sh.gpus.into());
        s.insert(
            "tokens_per_s".into(),
            tps.map_or(Value::Null, |t| serde_json::json!(t)),
        );
        s.insert("tokens_per_s_source".into(), source.into());
        s.insert("monthly_gpu_usd".into(), usd(monthly_gpu));
        s.insert("output_tokens".into(), output_tokens.into());
        s.insert("api_cost_usd".into(), usd(api_cost));
        let api_per_m = (output_tokens > 0).then(|| {
            (api_cost * Decimal::from(1_000_000) / Decimal::from(output_tokens)).round_dp(6)
        });
        s.insert(
            "api_cost_per_million_output_tokens_usd".into(),
            api_per_m.map_or(Value::Null, usd),
        );
        let per_hour_tokens = tps
            .and_then(|t| Decimal::from_f64_retain(t * 3600.0))
            .filter(|d| !d.is_zero());
        if let Some(tph) = per_hour_tokens {
            let own_per_m = (gpu_hour_total * Decimal::from(1_000_000) / tph).round_dp(6);
            s.insert(
                "self_host_cost_per_million_output_tokens_usd".into(),
                usd(own_per_m),
            );
            s.insert(
                "capacity_output_tokens_per_month".into(),
                (tph * Decimal::from(HOURS_PER_MONTH))
                    .round()
                    .to_string()
                    .parse::<u64>()
                    .unwrap_or(0)
                    .into(),
            );
        }
        let projected = (Decimal::from(output_tokens) * month_scale).round();
        s.insert(
            "projected_output_tokens_per_month".into(),
            projected.to_string().parse::<u64>().unwrap_or(0).into(),
        );
        if let Some(api_per_m) = api_per_m.filter(|d| !d.is_zero()) {
            let break_even = (monthly_gpu * Decimal::from(1_000_000) / api_per_m).round();
            s.insert(
                "break_even_output_tokens_per_month".into(),
                break_even.to_string().parse::<u64>().unwrap_or(0).into(),
            );
            s.insert(
                "self_hosting_cheaper_at_this_volume".into(),
                (projected >= break_even).into(),
            );
        }
        params.insert("self_host".into(), Value::Object(s));
    }
    Ok(Report {
        from: r.window.from,
        to: r.window.to,
        params,
        rows: out_rows,
        totals: Value::Object(totals),
        unpriced_models: unpriced,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn p(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn catalogs() -> Vec<PriceCatalog> {
        vec![PriceCatalog::shipped().unwrap_or_else(|e| panic!("{e}"))]
    }

    #[test]
    fn cost_parameters_parse_with_defaults() {
        let r = CostRequest::parse(&p(&[("from", "2026-11-01")]), &catalogs())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.group_by, vec![Group::Consumer, Group::Model]);
        assert_eq!(r.granularity, Granularity::Day);
        assert!(r.window.catalog.is_none());
        let r = CostRequest::parse(
            &p(&[
                ("group_by", "team,tag:feature"),
                ("granularity", "month"),
                ("to", "2026-11-02T12:00:00Z"),
                ("from", "2026-11-01"),
            ]),
            &catalogs(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(r.group_by, vec![Group::Team, Group::Tag("feature".into())]);
        assert_eq!(r.window.to - r.window.from, Duration::hours(36));
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let values: Vec<i64> = (1..=1000).collect();
        let mut hist: BTreeMap<i32, u64> = BTreeMap::new();
        for v in &values {
            let b = (((*v as f64) + 1.0).ln() * BUCKETS_PER_E).round() as i32;
            *hist.entry(b).or_default() += 1;
        }
        let mut hist: Vec<(i32, u64)> = hist.into_iter().collect();
        for (q, exact) in [(0.5, 500.0), (0.95, 950.0), (1.0, 1000.0)] {
            let got = quantile(&mut hist, q).unwrap();
            assert!((got - exact).abs() / exact < 0.01, "q{q}: {got} vs {exact}");
        }
        assert_eq!(quantile(&mut [], 0.5), None);
    }

    #[test]
    fn default_window_is_whole_hours() {
        let r = CostRequest::parse(&[], &catalogs()).unwrap();
        assert_eq!(hour_start(r.window.to), r.window.to);
        assert_eq!(r.window.to - r.window.from, Duration::days(30));
    }

    #[test]
    fn bad_parameters_are_named() {
        for (pairs, needle) in [
            (vec![("group_by", "region")], "group_by"),
            (vec![("group_by", "tag:")], "group_by"),
            (vec![("group_by", "model,model")], "twice"),
            (vec![("granularity", "week")], "granularity"),
            (vec![("from", "yesterday")], "not a date"),
            (vec![("from", "2026-11-02"), ("to", "2026-11-01")], "before"),
            (vec![("catalog", "1999-01-01")], "not loaded"),
            (vec![("colour", "red")], "unknown parameter"),
        ] {
            match CostRequest::parse(&p(&pairs), &catalogs()) {
                Err(QueryError::BadRequest(m)) => assert!(m.contains(needle), "{pairs:?}: {m}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
        for (pairs, needle) in [
            (vec![("reprice", "deepseek-r1")], "<model>:<other model>"),
            (vec![("reprice", "deepseek-r1:no-such-model")], "no price"),
            (vec![("gpu_hour_usd", "-1")], "positive"),
            (
                vec![("gpu_hour_usd", "2"), ("gpus", "0")],
                "positive integer",
            ),
            (vec![("tokens_per_s", "100")], "needs gpu_hour_usd"),
        ] {
            match RoiRequest::parse(&p(&pairs), &catalogs()) {
                Err(QueryError::BadRequest(m)) => assert!(m.contains(needle), "{pairs:?}: {m}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
    }
}
