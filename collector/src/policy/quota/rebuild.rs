//! Budgets rebuilt from the ledger on start: the spend of each budget's
//! current period, summed from the events (the lake, plus the spool not
//! yet in it) the way admission would have counted them, so a restarted
//! gateway enforces the same spend. The lake is the truth.

use std::collections::BTreeMap;

use axum::http::HeaderMap;
use chrono::{DateTime, Utc};
use tollgate_schemas::UsageEvent;

use super::{Action, Ask, Kind, Quota};
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
