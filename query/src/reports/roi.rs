//! The ROI report, per consumer and requested model, in its steps: price
//! the money lines (the ledger's cost, the output and thinking cost, and
//! what a `reprice` target would have cost), describe each row with its
//! rates and percentiles, total them, and, when asked, compare renting GPUs
//! with the API.

use std::collections::BTreeMap;

use datafusion::functions::expr_fn::coalesce;
use datafusion::logical_expr::{col, lit};
use rust_decimal::Decimal;
use serde_json::{Map, Value};
use tollgate_schemas::{PriceCatalog, Usd};

use crate::engine::Engine;
use crate::reports::cells::{Report, rate, ratio, usd};
use crate::reports::money::{Line, Sums, at_noon, line_cost, money_lines, price};
use crate::reports::request::{RoiRequest, SelfHost};
use crate::reports::stats;
use crate::{Principal, QueryError};

/// The monthly hours a rented GPU is billed for.
const HOURS_PER_MONTH: i64 = 730;

/// Per (consumer, requested model): the statistics that do not reprice.
type Stats = BTreeMap<(String, String), Map<String, Value>>;

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
    let stats = stats::collect(engine, who, &r.window).await?;
    let priced = Priced::of(lines, r, &catalog);
    let rows = priced
        .rows
        .iter()
        .map(|((consumer, model), a)| {
            let mut row = Map::new();
            row.insert("consumer".into(), consumer.clone().into());
            row.insert("model".into(), model.clone().into());
            row.extend(describe(a, stats.get(&(consumer.clone(), model.clone()))));
            Value::Object(row)
        })
        .collect();
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
        let compared = self_host(sh, r, &priced, &stats, &catalog);
        params.insert("self_host".into(), Value::Object(compared));
    }
    Ok(Report {
        from: r.window.from,
        to: r.window.to,
        params,
        rows,
        totals: Value::Object(totals(&priced.total, &stats)),
        unpriced_models: priced.unpriced,
    })
}

/// What one row (or the totals) cost, and what it would have.
#[derive(Default)]
struct Acc {
    sums: Sums,
    output_cost: Decimal,
    thinking: Decimal,
    /// The `reprice` target and the row's cost on it.
    repriced: Option<(String, Decimal)>,
}

/// The money lines priced, per row and in total.
struct Priced {
    rows: BTreeMap<(String, String), Acc>,
    total: Acc,
    /// Over the repriced lines: their cost, their cost on the target, and
    /// their output tokens.
    repriced_total: Option<(Decimal, Decimal, u64)>,
    unpriced: Vec<String>,
}

impl Priced {
    fn of(lines: Vec<Line>, r: &RoiRequest, catalog: &PriceCatalog) -> Priced {
        let mut p = Priced {
            rows: BTreeMap::new(),
            total: Acc::default(),
            repriced_total: None,
            unpriced: Vec::new(),
        };
        for l in lines {
            let key = |i: usize| match &l.keys[i] {
                Value::String(s) => s.clone(),
                _ => String::new(),
            };
            let cost = line_cost(&r.window, &l, &mut p.unpriced);
            let line_price = price(catalog, &l.priced_model, l.day);
            let at_output_price = |tokens: u64| {
                line_price.map_or(Decimal::ZERO, |lp| {
                    Usd::for_tokens(tokens, lp.output.decimal()).decimal()
                })
            };
            let (out_cost, thinking) = (
                at_output_price(l.tokens.output),
                at_output_price(l.reasoning),
            );
            let acc = p.rows.entry((key(0), key(1))).or_default();
            for a in [&mut *acc, &mut p.total] {
                a.sums.add(&l, cost);
                a.output_cost += out_cost;
                a.thinking += thinking;
            }
            let same = |a: &str, b: &str| same_model(catalog, r, a, b);
            let target = r.reprice.iter().find(|rp| {
                same(&key(1), &rp.from)
                    || l.priced_model.as_deref().is_some_and(|m| same(m, &rp.from))
            });
            if let Some(rp) = target {
                let alt = catalog
                    .price(&rp.to, at_noon(l.day))
                    .map_or(Decimal::ZERO, |tp| tp.cost(&l.tokens).decimal());
                let e = acc
                    .repriced
                    .get_or_insert_with(|| (rp.to.clone(), Decimal::ZERO));
                e.1 += alt;
                let t = p
                    .repriced_total
                    .get_or_insert((Decimal::ZERO, Decimal::ZERO, 0));
                t.0 += cost;
                t.1 += alt;
                t.2 += l.tokens.output;
            }
        }
        p
    }
}

/// Whether two names are one model in the catalog (aliases included).
fn same_model(catalog: &PriceCatalog, r: &RoiRequest, a: &str, b: &str) -> bool {
    let at = r.window.to;
    match (catalog.price(a, at), catalog.price(b, at)) {
        (Some(x), Some(y)) => x.model == y.model,
        _ => a.eq_ignore_ascii_case(b),
    }
}

/// A row's figures: its sums, rates and percentiles (from `stats`), the
/// cache's savings, cost per 1k requests, the thinking tax and the reprice.
fn describe(a: &Acc, stats: Option<&Map<String, Value>>) -> Map<String, Value> {
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
        for k in PER_ROW_ONLY {
            if *k != "fallback_reasons" {
                row.insert(k.to_string(), s.get(*k).cloned().unwrap_or(Value::Null));
            }
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
}

/// Figures that only make sense per row: the totals leave them out.
const PER_ROW_ONLY: &[&str] = &[
    "latency_p50_ms",
    "latency_p95_ms",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "output_tokens_per_s",
    "fallback_reasons",
];

/// The totals: the total's sums, with rates over every row.
fn totals(total: &Acc, stats: &Stats) -> Map<String, Value> {
    let mut all = Map::new();
    for s in stats.values() {
        for k in ["errors", "fallbacks", "cache_hits"] {
            let v = s.get(k).and_then(Value::as_u64).unwrap_or(0)
                + all.get(k).and_then(Value::as_u64).unwrap_or(0);
            all.insert(k.into(), v.into());
        }
    }
    let mut totals = describe(total, Some(&all));
    for k in PER_ROW_ONLY {
        totals.remove(*k);
    }
    totals
}

/// Renting GPUs against the API: the self-hosted cost per 1M output tokens
/// and the monthly output volume at which the rent breaks even.
fn self_host(
    sh: &SelfHost,
    r: &RoiRequest,
    priced: &Priced,
    stats: &Stats,
    catalog: &PriceCatalog,
) -> Map<String, Value> {
    let (api_cost, output_tokens) = match priced.repriced_total {
        Some((cost, _, out)) => (cost, out),
        None => (priced.total.sums.cost, priced.total.sums.tokens.output),
    };
    let measured = r.reprice.first().and_then(|rp| {
        stats
            .iter()
            .filter(|((_, m), _)| same_model(catalog, r, m, &rp.to))
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
    let window_hours =
        Decimal::from((r.window.to - r.window.from).num_seconds().max(1)) / Decimal::from(3600);
    let month_scale = Decimal::from(HOURS_PER_MONTH) / window_hours;
    let gpu_hour_total = sh.gpu_hour_usd * Decimal::from(sh.gpus);
    let monthly_gpu = gpu_hour_total * Decimal::from(HOURS_PER_MONTH);
    let count = |d: Decimal| d.round().to_string().parse::<u64>().unwrap_or(0);
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
    let api_per_m = (output_tokens > 0)
        .then(|| (api_cost * Decimal::from(1_000_000) / Decimal::from(output_tokens)).round_dp(6));
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
            count(tph * Decimal::from(HOURS_PER_MONTH)).into(),
        );
    }
    let projected = (Decimal::from(output_tokens) * month_scale).round();
    s.insert(
        "projected_output_tokens_per_month".into(),
        count(projected).into(),
    );
    if let Some(api_per_m) = api_per_m.filter(|d| !d.is_zero()) {
        let break_even = (monthly_gpu * Decimal::from(1_000_000) / api_per_m).round();
        s.insert(
            "break_even_output_tokens_per_month".into(),
            count(break_even).into(),
        );
        s.insert(
            "self_hosting_cheaper_at_this_volume".into(),
            (projected >= break_even).into(),
        );
    }
    s
}
