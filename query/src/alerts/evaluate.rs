//! The alert rules as arithmetic over the ledger's hourly sums, with the
//! clock passed in: budget thresholds, the burn-rate forecast, spend
//! anomalies and the pipeline's health checks. Each finding carries the
//! key that makes it fire once: the same finding from another process, or
//! after a restart, has the same key.

use std::collections::{BTreeMap, HashMap};

use chrono::{DateTime, Duration, TimeZone, Utc};
use rust_decimal::Decimal;
use tollgate_schemas::Usd;

use super::alert::{Alert, Budget, Status};
use super::config::{AlertsConfig, Kind, PipelineReading};
use super::ledger::Hour;

/// The start of the hour `t` is in, unix seconds.
pub fn hour_of(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(3600) * 3600
}

fn usd(scaled: i128) -> Decimal {
    Usd::from_scaled(scaled).unwrap_or_default().decimal()
}

/// `$1234.57`, or `$0.0043` below a dollar: for a person to read (records
/// keep exact values).
pub fn dollars(scaled: i128) -> String {
    let d = usd(scaled);
    if d.abs() >= Decimal::ONE || d.is_zero() {
        return format!("${:.2}", d.round_dp(2));
    }
    // Two significant digits, at least cents.
    let mut places = 2u32;
    while places < 10 && d.abs().round_dp(places) < Decimal::new(10, places) {
        places += 1;
    }
    format!("${:.*}", places as usize, d.round_dp(places))
}

fn at(secs: i64) -> DateTime<Utc> {
    Utc.timestamp_opt(secs, 0).single().unwrap_or_default()
}

/// Spend of budget `i` in its current period: the hours from the one its
/// period starts in (the sums are cut at the period's start).
pub fn period_spend(hours: &BTreeMap<i64, Hour>, i: usize, b: &Budget) -> i128 {
    hours
        .range(hour_of(b.start)..)
        .flat_map(|(_, h)| &h.groups)
        .filter_map(|g| g.budgets.get(i))
        .map(|s| s.in_period)
        .sum()
}

/// Every `alert_at` fraction budget `i`'s spend has reached this period.
pub fn thresholds(hours: &BTreeMap<i64, Hour>, i: usize, b: &Budget, source: &str) -> Vec<Alert> {
    let spent = period_spend(hours, i, b);
    let limit = b.spec.usd.to_scaled();
    let mut out = Vec::new();
    for &t in &b.spec.alert_at {
        if (spent as f64) < limit as f64 * t || (limit == 0 && spent == 0) {
            continue;
        }
        let pct = (t * 100.0).round();
        let mut a = Alert::new(
            format!("budget:{}:{}:{t}", b.spec.name, b.start.to_rfc3339()),
            Kind::Budget,
            &b.spec.name,
            format!(
                "Budget {}: {pct}% reached, {} of {} spent this {} (since {}).",
                b.spec.name,
                dollars(spent),
                dollars(limit),
                b.spec.period.as_str(),
                b.start
                    .with_timezone(&b.spec.timezone)
                    .format("%Y-%m-%d %H:%M %Z")
            ),
            source,
        );
        a.period(b);
        a.threshold = Some(t);
        a.value = Some(if limit > 0 {
            spent as f64 / limit as f64
        } else {
            1.0
        });
        a.spent_usd = Some(usd(spent));
        out.push(a);
    }
    out
}

/// The burn-rate forecast of budget `i`: the spend so far plus the rate of
/// the last `forecast_window_h` hours (the current hour up to `now`) until
/// the period ends. An alert when that passes the budget before it is
/// spent; its key has the overspend in steps of `forecast_step` budgets,
/// so it alerts again only when the projection worsens by a step.
pub fn forecast(
    hours: &BTreeMap<i64, Hour>,
    i: usize,
    b: &Budget,
    now: DateTime<Utc>,
    config: &AlertsConfig,
    source: &str,
) -> Option<Alert> {
    let limit = b.spec.usd.to_scaled();
    let spent = period_spend(hours, i, b);
    if limit <= 0 || spent >= limit || now >= b.end {
        return None;
    }
    let from = hour_of(now) - 3600 * (i64::from(config.forecast_window_h) - 1);
    let recent: i128 = hours
        .range(from..)
        .flat_map(|(_, h)| &h.groups)
        .filter_map(|g| g.budgets.get(i))
        .map(|s| s.all)
        .sum();
    let elapsed = (now.timestamp() - from).max(1) as f64;
    let rate = recent as f64 / elapsed; // scaled units per second
    let left = (b.end - now).num_seconds().max(0) as f64;
    let projected = spent as f64 + rate * left;
    if rate <= 0.0 || projected <= limit as f64 {
        return None;
    }
    let over = projected - limit as f64;
    let level = (over / (limit as f64 * config.forecast_step)).floor() as i64;
    let exhaustion = now + Duration::seconds(((limit - spent) as f64 / rate).ceil() as i64);
    let (projected, over) = (projected as i128, over as i128);
    let mut a = Alert::new(
        format!("forecast:{}:{}:{level}", b.spec.name, b.start.to_rfc3339()),
        Kind::Forecast,
        &b.spec.name,
        format!(
            "Budget {}: at the last {}h's rate ({}/h) it runs out at {} and the {} ends at {} spent, {} over {}.",
            b.spec.name,
            config.forecast_window_h,
            dollars((rate * 3600.0) as i128),
            exhaustion
                .with_timezone(&b.spec.timezone)
                .format("%Y-%m-%d %H:%M %Z"),
            b.spec.period.as_str(),
            dollars(projected),
            dollars(over),
            dollars(limit)
        ),
        source,
    );
    a.period(b);
    a.value = Some(spent as f64 / limit as f64);
    a.spent_usd = Some(usd(spent));
    a.projected_usd = Some(usd(projected));
    a.overspend_usd = Some(usd(over));
    a.exhaustion_at = Some(exhaustion);
    Some(a)
}

/// Which way an anomaly is looked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Consumer,
    Model,
}

impl Dimension {
    fn as_str(self) -> &'static str {
        match self {
            Dimension::Consumer => "consumer",
            Dimension::Model => "model",
        }
    }
}

/// Hours before `now`'s the index must hold for [`anomalies`].
pub fn anomaly_hours(config: &AlertsConfig) -> i64 {
    2 * i64::from(config.anomaly_window_h) + 2
}

/// Spend per hour of each consumer (or model) above `anomaly_factor`
/// times its median over the `anomaly_window_h` hours before (hours
/// without spend count as 0) and above `anomaly_min_usd`: the current
/// hour so far, or the last closed one. One alert per episode (a run of
/// such hours), keyed by the hour it began.
pub fn anomalies(
    hours: &BTreeMap<i64, Hour>,
    dim: Dimension,
    now: DateTime<Utc>,
    config: &AlertsConfig,
    source: &str,
) -> Vec<Alert> {
    let n = i64::from(config.anomaly_window_h);
    let current = hour_of(now);
    let first = current - 3600 * anomaly_hours(config);
    let mut series: HashMap<&str, BTreeMap<i64, i128>> = HashMap::new();
    for (&h, hour) in hours.range(first..) {
        for g in &hour.groups {
            let v = match dim {
                Dimension::Consumer => g.consumer.as_str(),
                Dimension::Model => g.model.as_str(),
            };
            if v.is_empty() {
                continue;
            }
            *series.entry(v).or_default().entry(h).or_default() += g.cost;
        }
    }
    let min = config.anomaly_min_usd * 1e10;
    let mut out = Vec::new();
    for (value, s) in &series {
        let spend = |h: i64| s.get(&h).copied().unwrap_or(0);
        let bar = |h: i64| {
            let mut window: Vec<i128> = (1..=n).map(|k| spend(h - 3600 * k)).collect();
            window.sort_unstable();
            let mid = window.len() / 2;
            let median = if window.len() % 2 == 1 {
                window[mid] as f64
            } else {
                (window[mid - 1] + window[mid]) as f64 / 2.0
            };
            (median * config.anomaly_factor).max(min)
        };
        let high = |h: i64| spend(h) as f64 > bar(h);
        let Some(last) = [current, current - 3600].into_iter().find(|&h| high(h)) else {
            continue;
        };
        let mut start = last;
        while start - 3600 >= current - 3600 * n && high(start - 3600) {
            start -= 3600;
        }
        let (now_spend, bar_now) = (spend(last), bar(last));
        let median = bar_now / config.anomaly_factor;
        let what = dim.as_str();
        let against = if median * config.anomaly_factor < min {
            format!(
                "over the {} alert floor (its {n}h median is {})",
                dollars(min as i128),
                dollars(median as i128)
            )
        } else {
            format!(
                "{:.1}x its {n}h median of {}",
                now_spend as f64 / median,
                dollars(median as i128)
            )
        };
        let mut a = Alert::new(
            format!("anomaly:{what}:{value}:{start}"),
            Kind::Anomaly,
            &format!("{what}:{value}"),
            format!(
                "Spend anomaly: {what} {value} spent {} in the hour from {}, {against}.",
                dollars(now_spend),
                at(last).format("%Y-%m-%d %H:00 UTC"),
            ),
            source,
        );
        match dim {
            Dimension::Consumer => a.consumer = Some(value.to_string()),
            Dimension::Model => a.model = Some(value.to_string()),
        }
        a.period_start = Some(at(start));
        a.spent_usd = Some(usd(now_spend));
        a.threshold = Some(config.anomaly_factor);
        // The hour's spend over its median (the factor the rule compares).
        a.value = (median > 0.0).then(|| now_spend as f64 / median);
        out.push(a);
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// One health check's state now: a condition that fires when it starts
/// and sends a resolved notice when it clears.
#[derive(Debug, Clone)]
pub struct Condition {
    /// `ingest_lag`, `spool_backlog`, `dead_letters`, `lake_completeness`.
    pub check: &'static str,
    /// What it is about: a spool, an instance's hour, the lake.
    pub subject: String,
    pub firing: bool,
    pub value: f64,
    pub threshold: f64,
    pub message: String,
}

/// The health checks over a reading, the lake's dead-letter count and
/// the ledger's rows per hour.
pub fn pipeline(
    reading: Option<&PipelineReading>,
    dead_letters: Option<u64>,
    hours: &BTreeMap<i64, Hour>,
    now: DateTime<Utc>,
    config: &AlertsConfig,
) -> Vec<Condition> {
    let mut out = Vec::new();
    if let Some(n) = dead_letters {
        out.push(Condition {
            check: "dead_letters",
            subject: "lake".into(),
            firing: n >= config.dead_letters,
            value: n as f64,
            threshold: config.dead_letters as f64,
            message: format!(
                "{n} dead letter(s) in the lake (messages that were not valid usage events; see dead_letters/)."
            ),
        });
    }
    let Some(r) = reading else {
        return out;
    };
    let lag = r
        .oldest_unsent
        .map_or(0.0, |t| (now - t).num_milliseconds().max(0) as f64 / 1000.0);
    out.push(Condition {
        check: "ingest_lag",
        subject: r.spool.clone(),
        firing: lag > config.ingest_lag_s as f64,
        value: lag,
        threshold: config.ingest_lag_s as f64,
        message: format!(
            "Ingest lag on {}: the oldest spooled event not yet drained is {lag:.0} s old (threshold {} s).",
            r.instance, config.ingest_lag_s
        ),
    });
    out.push(Condition {
        check: "spool_backlog",
        subject: r.spool.clone(),
        firing: r.backlog_bytes > config.spool_backlog_bytes,
        value: r.backlog_bytes as f64,
        threshold: config.spool_backlog_bytes as f64,
        message: format!(
            "Spool backlog on {}: {} MiB not yet drained (threshold {} MiB).",
            r.instance,
            r.backlog_bytes >> 20,
            config.spool_backlog_bytes >> 20
        ),
    });
    let after = config.completeness_after.as_secs() as i64;
    for &(h, spooled) in &r.spooled_by_hour {
        if h + 3600 + after > now.timestamp() || spooled == 0 {
            continue;
        }
        let rows: u64 = hours.get(&h).map_or(0, |hour| {
            (hour.groups.iter())
                .filter(|g| g.instance == r.instance)
                .map(|g| g.rows)
                .sum()
        });
        let missing = spooled.saturating_sub(rows);
        let share = missing as f64 / spooled as f64;
        out.push(Condition {
            check: "lake_completeness",
            subject: format!("{}:{}", r.instance, at(h).format("%Y-%m-%dT%H")),
            firing: missing > 0 && share > config.completeness_missing,
            value: share,
            threshold: config.completeness_missing,
            message: format!(
                "Lake completeness on {}: the hour from {} has {rows} of the {spooled} events the gateway spooled ({missing} missing).",
                r.instance,
                at(h).format("%Y-%m-%d %H:00 UTC")
            ),
        });
    }
    out
}

/// The alert a condition's start (or end) sends; `episode` tells one
/// episode of the same check and subject from the next.
pub fn condition_alert(c: &Condition, episode: &str, status: Status, source: &str) -> Alert {
    let suffix = match status {
        Status::Firing => "",
        Status::Resolved => ":resolved",
    };
    let message = match status {
        Status::Firing => c.message.clone(),
        Status::Resolved => format!("Resolved: {}", c.message),
    };
    let mut a = Alert::new(
        format!("pipeline:{}:{}:{episode}{suffix}", c.check, c.subject),
        Kind::Pipeline,
        &format!("{}:{}", c.check, c.subject),
        message,
        source,
    );
    a.status = status;
    a.threshold = Some(c.threshold);
    a.value = Some(c.value);
    a
}

#[cfg(test)]
mod tests;
