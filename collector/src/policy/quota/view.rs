//! `GET /v1/limits`: each counter's used, reserved, limit and reset time.
//! The admin token sees every rule and key; a consumer's key sees the
//! counters that are its own (keyed by its name or team, its budgets and
//! the global ones that apply to it).
//!
//! With Redis the figures are the shared ones; the counters listed are
//! those this gateway has seen in their window, plus every budget.

use std::sync::Arc;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};
use tollgate_schemas::Usd;

use super::span::Span;
use super::{Action, Figures, Kind, Quota};
use crate::config::limits::Unit;

/// Who is asking.
pub enum Viewer<'a> {
    Admin,
    Consumer {
        name: &'a str,
        team: Option<&'a str>,
    },
}

struct Row {
    limit: usize,
    key: String,
    figures: Figures,
}

impl Quota {
    /// The `/v1/limits` body: `{"object": "list", "data": [...]}`, one
    /// entry per counter, amounts in tokens, requests or USD (a decimal
    /// string).
    pub async fn view(self: &Arc<Self>, viewer: &Viewer<'_>) -> Value {
        let now = self.now();
        let frames: Vec<_> = (0..self.limits.len())
            .map(|id| self.span_of(id).frame(now))
            .collect();
        let mut rows: Vec<Row> = self
            .local
            .snapshot(&frames)
            .into_iter()
            .map(|(limit, key, figures)| Row {
                limit,
                key,
                figures,
            })
            .collect();
        // Budgets and global counters show even before their first use.
        for (id, &(r, _)) in self.limits.iter().enumerate() {
            let rule = &self.rules[r];
            let global = rule.kind == Kind::Budget || rule.is_global();
            if global && !rows.iter().any(|row| row.limit == id && row.key == "*") {
                rows.push(Row {
                    limit: id,
                    key: "*".into(),
                    figures: Figures::default(),
                });
            }
        }
        rows.retain(|row| self.visible(row, viewer));
        rows.sort_by(|a, b| (a.limit, &a.key).cmp(&(b.limit, &b.key)));
        if let Some(s) = self.shared.as_ref().filter(|s| s.is_up()) {
            let keys: Vec<(String, i64)> = rows
                .iter()
                .map(|row| {
                    (
                        self.redis_key(row.limit, &row.key),
                        frames[row.limit].oldest_live,
                    )
                })
                .collect();
            if let Ok(figures) = s.read(&keys).await {
                for (row, f) in rows.iter_mut().zip(figures) {
                    row.figures = f;
                }
            }
        }
        let data: Vec<Value> = rows.iter().map(|row| self.entry(row, now)).collect();
        json!({
            "object": "list",
            "shared": self.shared.as_ref().map(|s| s.is_up()),
            "data": data,
        })
    }

    fn visible(&self, row: &Row, viewer: &Viewer) -> bool {
        let Viewer::Consumer { name, team } = viewer else {
            return true;
        };
        self.limit(row.limit)
            .is_some_and(|(rule, _)| rule.owned_by(&row.key, name, *team))
    }

    fn entry(&self, row: &Row, now: DateTime<Utc>) -> Value {
        let Some((rule, l)) = self.limit(row.limit) else {
            return Value::Null;
        };
        let f = row.figures;
        let settled = (f.used - f.reserved).max(0);
        let amount = |v: i64| match l.unit {
            Unit::Usd => json!(Usd::from_scaled(v as i128).unwrap_or(Usd::ZERO).to_string()),
            _ => json!(v),
        };
        let frame = l.span.frame(now);
        let resets_at = match l.span {
            Span::Calendar(..) => Some(l.span.expiry(frame.current)),
            Span::Rolling(_) => f.newest.map(|b| l.span.expiry(b)),
        };
        let ts = |t: DateTime<Utc>| t.to_rfc3339_opts(SecondsFormat::Millis, true);
        let (action, fallback) = match &rule.action {
            Action::Reject if rule.kind == Kind::Budget => ("block", None),
            Action::Reject => ("reject", None),
            Action::Observe => ("alert_only", None),
            Action::Fallback(m) if rule.kind == Kind::Budget => ("downgrade", Some(m.as_str())),
            Action::Fallback(m) => ("fallback", Some(m.as_str())),
        };
        let mut e = json!({
            "rule": &*rule.name,
            "kind": match rule.kind { Kind::RateLimit => "rate_limit", Kind::Budget => "budget" },
            "key": row.key,
            "unit": l.unit.as_str(),
            "window": l.span.name(),
            "limit": amount(l.limit),
            "used": amount(settled),
            "reserved": amount(f.reserved),
            "remaining": amount((l.limit - f.used).max(0)),
            "resets_at": resets_at.map(ts),
            "action": action,
            "fallback": fallback,
        });
        if let Span::Calendar(_, tz) = l.span {
            e["period_start"] = json!(ts(
                DateTime::from_timestamp(frame.current, 0).unwrap_or_default()
            ));
            e["timezone"] = json!(tz.name());
        }
        e
    }
}
