//! The ROI report's statistics that do not reprice, per (consumer,
//! requested model): error, fallback and cache hit rates, fallback reasons,
//! latency and time-to-first-token percentiles, output tokens/s.

use std::collections::BTreeMap;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::DataType;
use datafusion::functions::expr_fn::coalesce;
use datafusion::functions::math::expr_fn::{ln, round};
use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::{Expr, SortExpr, cast, col, lit, when};
use serde_json::{Map, Value};

use crate::engine::Engine;
use crate::reports::cells::{text_at, u64_at};
use crate::reports::money::window_rows;
use crate::reports::request::Window;
use crate::{Principal, QueryError};

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
pub(crate) async fn collect(
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

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
}
