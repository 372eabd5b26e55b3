//! Budgets rebuilt from the ledger on start: the spend of each budget's
//! current period, summed from the events (the lake, plus the spool not
//! yet in it) the way admission would have counted them, so a restarted
//! gateway enforces the same spend. The lake is the truth: with Redis,
//! [`Quota::reconcile`] compares the shared counters with it periodically.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use tollgate_schemas::UsageEvent;

use super::{Action, Ask, Kind, Quota, shared};
use crate::config::limits::scaled;

/// Spend being summed, one figure per budget.
pub struct Rebuild<'q> {
    quota: &'q Quota,
    /// (rule index, period start, spend in 10^-10 USD)
    budgets: Vec<(usize, DateTime<Utc>, i64)>,
    pub events: u64,
}

impl Quota {
    /// A rebuild of every budget's current period.
    pub fn rebuild(&self) -> Rebuild<'_> {
        let now = self.now();
        let budgets = self
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.kind == Kind::Budget)
            .filter_map(|(i, r)| {
                let start = r.limits.first()?.span.frame(now).current;
                Some((i, DateTime::from_timestamp(start, 0)?, 0))
            })
            .collect();
        Rebuild {
            quota: self,
            budgets,
            events: 0,
        }
    }
}

impl Rebuild<'_> {
    /// The earliest period start: older events count for no budget.
    /// `None`: there are no budgets.
    pub fn since(&self) -> Option<DateTime<Utc>> {
        self.budgets.iter().map(|b| b.1).min()
    }

    /// Counts one event in every budget that would have taken it.
    pub fn add(&mut self, e: &UsageEvent) {
        let Some(cost) = e.cost_usd.and_then(scaled).filter(|c| *c != 0) else {
            return;
        };
        static NO_HEADERS: std::sync::LazyLock<HeaderMap> =
            std::sync::LazyLock::new(HeaderMap::new);
        let quota = self.quota;
        let model = Self::admitted_as(quota, e);
        let ask = Ask {
            model: model.unwrap_or(""),
            consumer: e.consumer.as_deref(),
            team: e.team.as_deref(),
            tags: &e.tags,
            headers: &NO_HEADERS,
            query: None,
            peer: None,
        };
        self.events += 1;
        for (rule, start, spend) in &mut self.budgets {
            if e.ts_start >= *start && quota.rules[*rule].applies(&ask) {
                *spend += cost;
            }
        }
    }

    /// The model the rules saw: the one asked for, or the fallback a
    /// tripped limit sent the request to (named by the rule in
    /// `limit_key`, not by the event).
    fn admitted_as<'a>(quota: &'a Quota, e: &'a UsageEvent) -> Option<&'a str> {
        let by_limit = matches!(
            e.fallback_reason.as_deref(),
            Some("rate_limited" | "budget_exhausted")
        );
        let rule = e.limit_key.as_deref().and_then(|k| k.split_once(':'));
        if by_limit && let Some((name, _)) = rule {
            let fallback = quota.rules.iter().find_map(|r| match &r.action {
                Action::Fallback(m) if &*r.name == name => Some(m.as_str()),
                _ => None,
            });
            if fallback.is_some() {
                return fallback;
            }
        }
        e.requested_model.as_deref()
    }

    /// Each budget's spend by name, in 10^-10 USD.
    pub fn spend(&self) -> BTreeMap<String, i64> {
        self.budgets
            .iter()
            .map(|(rule, _, spend)| (self.quota.rules[*rule].name.to_string(), *spend))
            .collect()
    }
}

/// What the last reconciliation found per budget: the shared counter's
/// settled spend minus the ledger's, in 10^-10 USD (positive: spend not in
/// the lake yet, or counted twice; negative: spend the counter lost).
#[derive(Debug, Default, Clone)]
pub struct Drift(std::sync::Arc<std::sync::Mutex<BTreeMap<String, i64>>>);

impl Quota {
    /// Compares each budget's shared (Redis) counter with `ledger` (its
    /// spend by name, from [`Rebuild::spend`]); a counter below the ledger
    /// lost spend (a Redis restarted without persistence) and is raised to
    /// it, a counter above it is left (events still on their way to the
    /// lake). Logs and records the drift. No-op without Redis or while it
    /// is away.
    pub async fn reconcile(&self, ledger: &BTreeMap<String, i64>) {
        let Some(s) = self.shared.as_ref().filter(|s| s.is_up()) else {
            return;
        };
        let now = self.now();
        for (id, &(r, l)) in self.limits.iter().enumerate() {
            let rule = &self.rules[r];
            let Some(&truth) = ledger.get(&*rule.name) else {
                continue;
            };
            let span = rule.limits[l].span;
            let frame = span.frame(now);
            let key = self.redis_key(id, "*");
            let Ok(figures) = s.read(&[(key.clone(), frame.oldest_live)]).await else {
                return;
            };
            let Some(f) = figures.first() else { continue };
            let counted = f.used - f.reserved;
            let drift = counted - truth;
            if let Ok(mut d) = self.drift.0.lock() {
                d.insert(rule.name.to_string(), drift);
            }
            if drift != 0 {
                tracing::warn!(
                    budget = &*rule.name,
                    counted_usd = %usd(counted),
                    ledger_usd = %usd(truth),
                    "budget counter and ledger differ"
                );
            }
            if drift < 0 {
                s.send(vec![shared::Op {
                    key: key.into(),
                    bucket: frame.current,
                    from: frame.oldest_live,
                    used: -drift,
                    reserved: 0,
                    keep_ms: span.keep_ms(frame.current, now),
                }]);
            }
        }
    }

    /// The drift the last reconciliation found, for `/metrics`.
    pub fn drift(&self) -> &Drift {
        &self.drift
    }
}

fn usd(units: i64) -> tollgate_schemas::Usd {
    tollgate_schemas::Usd::from_scaled(i128::from(units)).unwrap_or_default()
}

impl tollgate_schemas::metrics::Collector for Drift {
    fn encode(
        &self,
        mut e: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        let Ok(drift) = self.0.lock() else {
            return Ok(());
        };
        if drift.is_empty() {
            return Ok(());
        }
        let mut family = e.encode_descriptor(
            "tollgate_budget_drift_usd",
            "Shared budget counter minus the ledger's spend at the last reconciliation (USD).",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (name, units) in drift.iter() {
            let value = *units as f64 / 1e10;
            prometheus_client::metrics::gauge::ConstGauge::new(value)
                .encode(family.encode_family(&[("budget", name.as_str())])?)?;
        }
        Ok(())
    }
}
