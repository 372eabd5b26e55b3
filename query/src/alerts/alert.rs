//! One alert, as it is recorded, listed and sent, and the budget period
//! an alert may be about.

use chrono::{DateTime, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::config::Kind;
use crate::rules::BudgetSpec;

/// A budget with its current period.
#[derive(Debug, Clone)]
pub struct Budget<'a> {
    pub spec: &'a BudgetSpec,
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

/// Whether a condition started or ended; budget, forecast and anomaly
/// alerts only fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Firing,
    Resolved,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        }
    }
}

/// One alert: the `json` webhook body, a `GET /v1/alerts` item and a row
/// of the `alerts` table. Money is USD as decimal strings, exact; times
/// are RFC 3339 UTC.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    /// UUIDv7; the same on every delivery attempt.
    pub id: String,
    /// What makes it fire once: `budget:<name>:<period start>:<fraction>`,
    /// `forecast:<name>:<period start>:<step>`,
    /// `anomaly:<consumer|model>:<value>:<episode start>`,
    /// `pipeline:<check>:<subject>:<episode>[:resolved]`.
    pub key: String,
    pub kind: Kind,
    pub status: Status,
    /// The budget, `consumer:<name>` / `model:<name>`, or `<check>:<subject>`.
    pub name: String,
    pub fired_at: DateTime<Utc>,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consumer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_start: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_end: Option<DateTime<Utc>>,
    /// The fraction (budget), factor (anomaly) or level (pipeline) crossed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<f64>,
    /// The measured figure: the spent fraction, the factor, seconds, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_usd: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spent_usd: Option<Decimal>,
    /// Spend at the period's end at the recent rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub projected_usd: Option<Decimal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overspend_usd: Option<Decimal>,
    /// When the budget runs out at the recent rate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exhaustion_at: Option<DateTime<Utc>>,
    /// The process that sent it.
    pub source: String,
}

impl Alert {
    pub fn new(key: String, kind: Kind, name: &str, message: String, source: &str) -> Alert {
        Alert {
            id: uuid::Uuid::now_v7().to_string(),
            key,
            kind,
            status: Status::Firing,
            name: name.to_string(),
            fired_at: Utc::now(),
            message,
            consumer: None,
            model: None,
            period_start: None,
            period_end: None,
            threshold: None,
            value: None,
            budget_usd: None,
            spent_usd: None,
            projected_usd: None,
            overspend_usd: None,
            exhaustion_at: None,
            source: source.to_string(),
        }
    }

    pub(crate) fn period(&mut self, b: &Budget) {
        self.period_start = Some(b.start);
        self.period_end = Some(b.end);
        self.budget_usd = Some(b.spec.usd.decimal());
    }
}
