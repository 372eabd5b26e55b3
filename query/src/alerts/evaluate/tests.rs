use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use tollgate_schemas::Usd;
use tollgate_schemas::period::Period;

use super::*;
use crate::alerts::ledger::{BudgetSums, Group, Hour};
use crate::rules::{BudgetSpec, RuleScope};

const DOLLAR: i128 = 10_000_000_000;

fn t(h: u32, m: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 3, 10, h, m, 0).unwrap()
}

fn spec(usd: i64, period: Period, alert_at: &[f64]) -> BudgetSpec {
    BudgetSpec {
        name: "team-a".into(),
        scope: RuleScope::default(),
        usd: Usd::from_scaled(i128::from(usd) * DOLLAR).unwrap(),
        period,
        timezone: chrono_tz::UTC,
        alert_at: alert_at.to_vec(),
        on_exhausted: "block".into(),
        downgrade: None,
    }
}

fn group(consumer: &str, model: &str, cost: i128, rows: u64) -> Group {
    Group {
        consumer: consumer.into(),
        model: model.into(),
        instance: "gw-1".into(),
        rows,
        cost,
        budgets: vec![BudgetSums {
            all: cost,
            in_period: cost,
        }],
    }
}

/// `per_hour(h)` dollars for consumer `c` in each hour from `from` to `to` (hour starts).
fn hours(spend: &[(DateTime<Utc>, &str, i128)]) -> BTreeMap<i64, Hour> {
    let mut out: BTreeMap<i64, Hour> = BTreeMap::new();
    for (at, c, cost) in spend {
        out.entry(hour_of(*at))
            .or_default()
            .groups
            .push(group(c, "deepseek-r1", *cost, 1));
    }
    out
}

fn budget(spec: &BudgetSpec, now: DateTime<Utc>) -> Budget<'_> {
    let start = tollgate_schemas::period::period_start(spec.period, spec.timezone, now);
    Budget {
        spec,
        start,
        end: tollgate_schemas::period::period_end(spec.period, spec.timezone, start),
    }
}

#[test]
fn each_threshold_reached_fires_with_its_own_key() {
    let s = spec(10, Period::Day, &[0.5, 0.8, 1.0]);
    let b = budget(&s, t(12, 0));
    let six = hours(&[(t(9, 0), "a", 3 * DOLLAR), (t(10, 0), "a", 3 * DOLLAR)]);
    let fired = thresholds(&six, 0, &b, "q");
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].key, "budget:team-a:2026-03-10T00:00:00+00:00:0.5");
    assert!(
        fired[0].message.contains("$6.00 of $10.00"),
        "{}",
        fired[0].message
    );
    let more = hours(&[
        (t(9, 0), "a", 3 * DOLLAR),
        (t(11, 0), "a", 55 * DOLLAR / 10),
    ]);
    let keys: Vec<String> = thresholds(&more, 0, &b, "q")
        .into_iter()
        .map(|a| a.key)
        .collect();
    assert_eq!(keys.len(), 2);
    assert!(keys[1].ends_with(":0.8"));
}

#[test]
fn spend_before_the_period_does_not_count() {
    let s = spec(10, Period::Day, &[0.5]);
    let b = budget(&s, t(1, 0));
    // Yesterday's $9 is in the index (for the forecast's window) but not this period's.
    let mut h = hours(&[(t(0, 10), "a", DOLLAR)]);
    h.entry(hour_of(t(0, 0)) - 3600)
        .or_default()
        .groups
        .push(Group {
            budgets: vec![BudgetSums {
                all: 9 * DOLLAR,
                in_period: 0,
            }],
            ..group("a", "m", 9 * DOLLAR, 1)
        });
    assert_eq!(period_spend(&h, 0, &b), DOLLAR);
    assert!(thresholds(&h, 0, &b, "q").is_empty());
}

#[test]
fn the_forecast_projects_the_recent_rate_to_the_period_end() {
    let s = spec(100, Period::Day, &[]);
    let now = t(12, 0);
    let b = budget(&s, now);
    let spend: Vec<(DateTime<Utc>, &str, i128)> =
        (0..12).map(|h| (t(h, 30), "a", 6 * DOLLAR)).collect();
    let h = hours(&spend);
    let config = AlertsConfig::default(); // 6 h window, steps of 25%
    let a = forecast(&h, 0, &b, now, &config, "q").unwrap();
    // $72 spent; hours 07..11 spent $30 in the 5 h since 07:00: $6/h;
    // 12 h left: $72 more -> $144, $44 over; out of money after $28 more.
    assert_eq!(a.spent_usd, Some(Decimal::from(72)));
    assert_eq!(a.projected_usd.map(|d| d.round()), Some(Decimal::from(144)));
    assert_eq!(a.overspend_usd.map(|d| d.round()), Some(Decimal::from(44)));
    assert_eq!(a.exhaustion_at, Some(t(16, 40)));
    assert_eq!(a.key, "forecast:team-a:2026-03-10T00:00:00+00:00:1");
    assert!(a.message.contains("2026-03-10 16:40 UTC"), "{}", a.message);
    // A worse rate is a new step, so a new alert.
    let mut worse = h.clone();
    worse
        .get_mut(&hour_of(t(11, 0)))
        .unwrap()
        .groups
        .push(group("a", "m", 10 * DOLLAR, 1));
    let w = forecast(&worse, 0, &b, now, &config, "q").unwrap();
    assert_ne!(w.key, a.key);
    // Half the rate stays under the budget: nothing.
    let calm: Vec<(DateTime<Utc>, &str, i128)> =
        (0..12).map(|h| (t(h, 30), "a", 3 * DOLLAR)).collect();
    assert!(forecast(&hours(&calm), 0, &b, now, &config, "q").is_none());
}

#[test]
fn a_spent_budget_or_an_idle_one_has_no_forecast() {
    let s = spec(10, Period::Day, &[]);
    let now = t(12, 0);
    let b = budget(&s, now);
    let config = AlertsConfig::default();
    assert!(
        forecast(
            &hours(&[(t(11, 0), "a", 11 * DOLLAR)]),
            0,
            &b,
            now,
            &config,
            "q"
        )
        .is_none()
    );
    assert!(forecast(&BTreeMap::new(), 0, &b, now, &config, "q").is_none());
}

#[test]
fn an_hour_far_above_the_trailing_median_is_one_anomaly_per_episode() {
    let config = AlertsConfig::default(); // 5x the 24 h median, at least $1
    let now = t(12, 20);
    let mut spend: Vec<(DateTime<Utc>, &str, i128)> = Vec::new();
    for k in 1..=30i64 {
        let at = now - chrono::Duration::hours(k);
        spend.push((at, "steady", DOLLAR));
        spend.push((at, "spiky", DOLLAR));
    }
    spend.push((now, "steady", DOLLAR));
    spend.push((now, "spiky", 12 * DOLLAR));
    let found = anomalies(&hours(&spend), Dimension::Consumer, now, &config, "q");
    assert_eq!(found.len(), 1, "{found:?}");
    let a = &found[0];
    assert_eq!(a.consumer.as_deref(), Some("spiky"));
    assert_eq!(a.key, format!("anomaly:consumer:spiky:{}", hour_of(now)));
    // An hour later, still high: the same episode, the same key.
    let later = now + chrono::Duration::hours(1);
    spend.push((later, "spiky", 12 * DOLLAR));
    let again = anomalies(&hours(&spend), Dimension::Consumer, later, &config, "q");
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].key, a.key);
}

#[test]
fn small_spend_over_nothing_is_not_an_anomaly() {
    let config = AlertsConfig::default();
    let now = t(12, 0);
    let found = anomalies(
        &hours(&[(now, "new", DOLLAR / 2)]),
        Dimension::Model,
        now,
        &config,
        "q",
    );
    assert!(found.is_empty());
    let big = anomalies(
        &hours(&[(now, "new", 2 * DOLLAR)]),
        Dimension::Model,
        now,
        &config,
        "q",
    );
    assert_eq!(big.len(), 1);
    assert_eq!(big[0].model.as_deref(), Some("deepseek-r1"));
}

#[test]
fn pipeline_checks_compare_their_readings_with_the_thresholds() {
    let config = AlertsConfig::default(); // lag 300 s, completeness checked 900 s after the hour
    let now = t(12, 30);
    let reading = PipelineReading {
        instance: "gw-1".into(),
        spool: "data/spool".into(),
        backlog_bytes: 1 << 20,
        oldest_unsent: Some(now - chrono::Duration::seconds(400)),
        spooled_by_hour: vec![
            (hour_of(t(10, 0)), 10),
            (hour_of(t(11, 0)), 5),
            (hour_of(t(12, 0)), 3),
        ],
    };
    let mut lake = BTreeMap::new();
    lake.insert(
        hour_of(t(10, 0)),
        Hour {
            signature: 0,
            groups: vec![group("a", "m", 0, 7)],
        },
    );
    lake.insert(
        hour_of(t(11, 0)),
        Hour {
            signature: 0,
            groups: vec![group("a", "m", 0, 5)],
        },
    );
    let c = pipeline(Some(&reading), Some(0), &lake, now, &config);
    let get = |check: &str, subject: &str| {
        c.iter()
            .find(|x| x.check == check && x.subject == subject)
            .cloned()
    };
    assert!(get("ingest_lag", "data/spool").unwrap().firing);
    assert!(!get("spool_backlog", "data/spool").unwrap().firing);
    assert!(!get("dead_letters", "lake").unwrap().firing);
    let ten = get("lake_completeness", "gw-1:2026-03-10T10").unwrap();
    assert!(ten.firing);
    assert!((ten.value - 0.3).abs() < 1e-9);
    assert!(
        !get("lake_completeness", "gw-1:2026-03-10T11")
            .unwrap()
            .firing
    );
    // 12:00 is not closed yet.
    assert!(get("lake_completeness", "gw-1:2026-03-10T12").is_none());
    let resolved = condition_alert(&ten, "ep1", Status::Resolved, "q");
    assert_eq!(
        resolved.key,
        "pipeline:lake_completeness:gw-1:2026-03-10T10:ep1:resolved"
    );
    assert!(resolved.message.starts_with("Resolved: "));
}

#[test]
fn dollars_read_as_cents_or_two_significant_digits() {
    assert_eq!(dollars(1234 * DOLLAR + DOLLAR / 2), "$1234.50");
    assert_eq!(dollars(DOLLAR / 2), "$0.50");
    assert_eq!(dollars(43 * DOLLAR / 10_000), "$0.0043");
    assert_eq!(dollars(0), "$0.00");
}
