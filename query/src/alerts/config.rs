//! `[alerts]` and `[[alerts.webhooks]]`: how often alerts are evaluated,
//! the forecast, anomaly and pipeline thresholds, and where they are sent.
//! Validated at start like every other section; budget thresholds come
//! from each budget's `alert_at`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

use serde::Deserialize;
use tollgate_schemas::config::{Invalid, Secret};
use toml::Spanned;

/// What an alert is about; a webhook's `kinds` filter takes these names.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A budget's spend crossed one of its `alert_at` fractions.
    Budget,
    /// A budget's spend is projected past it before the period ends.
    Forecast,
    /// An hour's spend of a consumer or model far above its usual.
    Anomaly,
    /// Ingest lag, spool backlog, dead letters, lake completeness.
    Pipeline,
}

impl Kind {
    pub const ALL: [Kind; 4] = [Kind::Budget, Kind::Forecast, Kind::Anomaly, Kind::Pipeline];

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Budget => "budget",
            Kind::Forecast => "forecast",
            Kind::Anomaly => "anomaly",
            Kind::Pipeline => "pipeline",
        }
    }
}

/// A webhook's body: `json` is the alert record as `GET /v1/alerts` lists
/// it; `slack` is Slack's incoming-webhook shape (`text` plus `blocks`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Json,
    Slack,
}

#[derive(Debug, Clone)]
pub struct Webhook {
    pub url: String,
    pub format: Format,
    /// Signs each body with HMAC-SHA256 (header `x-tollgate-signature`).
    pub secret: Option<Secret>,
    /// Empty: every kind.
    pub kinds: Vec<Kind>,
    pub timeout: Duration,
}

impl Webhook {
    pub fn takes(&self, kind: Kind) -> bool {
        self.kinds.is_empty() || self.kinds.contains(&kind)
    }

    /// Names the webhook in the outbox: 16 hex digits of the URL's
    /// SHA-256 (the URL itself may hold a credential).
    pub fn id(&self) -> String {
        use sha2::Digest;
        hex::encode(&sha2::Sha256::digest(self.url.as_bytes())[..8])
    }

    /// For logs: the scheme, host and port, and the id; never the path,
    /// query or user info, where webhook URLs keep their secrets.
    pub fn describe(&self) -> String {
        match reqwest::Url::parse(&self.url) {
            Ok(u) => format!(
                "{}://{}{} ({})",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.port().map(|p| format!(":{p}")).unwrap_or_default(),
                self.id()
            ),
            Err(_) => self.id(),
        }
    }
}

/// The validated `[alerts]` section.
#[derive(Debug, Clone)]
pub struct AlertsConfig {
    /// How often the ledger is read and alerts evaluated.
    pub evaluate: Duration,
    /// Hours of recent spend the burn-rate forecast extrapolates.
    pub forecast_window_h: u32,
    /// A forecast alerts again when the projected overspend has grown by
    /// this fraction of the budget since the last forecast alert.
    pub forecast_step: f64,
    /// An hour's spend above this many times the trailing median is an
    /// anomaly...
    pub anomaly_factor: f64,
    /// ...the median of this many hours before it...
    pub anomaly_window_h: u32,
    /// ...and only above this much spend in the hour (USD).
    pub anomaly_min_usd: f64,
    /// Ingest lag (the oldest spooled event not yet drained), seconds.
    pub ingest_lag_s: u64,
    /// Spool backlog, bytes.
    pub spool_backlog_bytes: u64,
    /// Dead letters in the lake at or above this count.
    pub dead_letters: u64,
    /// A closed hour whose lake rows fall short of the gateway's own count
    /// by more than this fraction...
    pub completeness_missing: f64,
    /// ...checked once the hour has been closed this long.
    pub completeness_after: Duration,
    /// Alerts not yet delivered to every webhook, kept across restarts.
    pub outbox_dir: PathBuf,
    pub webhooks: Vec<Webhook>,
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            evaluate: Duration::from_secs(2),
            forecast_window_h: 6,
            forecast_step: 0.25,
            anomaly_factor: 5.0,
            anomaly_window_h: 24,
            anomaly_min_usd: 1.0,
            ingest_lag_s: 300,
            spool_backlog_bytes: 256 << 20,
            dead_letters: 1,
            completeness_missing: 0.0,
            completeness_after: Duration::from_secs(900),
            outbox_dir: PathBuf::from("data/alerts"),
            webhooks: Vec::new(),
        }
    }
}

/// What the process running the gateway can say about its part of the
/// pipeline.
#[derive(Debug, Clone, Default)]
pub struct PipelineReading {
    /// The gateway's `gateway_instance`.
    pub instance: String,
    /// The spool directory: names the ingest-lag and backlog checks, so a
    /// restart under a new instance name (the default is host-pid) still
    /// resolves what the last run opened.
    pub spool: String,
    /// Spooled and not yet drained, bytes.
    pub backlog_bytes: u64,
    /// When the oldest event not yet drained was spooled.
    pub oldest_unsent: Option<DateTime<Utc>>,
    /// Events spooled per whole hour (unix seconds of its start).
    pub spooled_by_hour: Vec<(i64, u64)>,
}

/// What the gateway's process knows of its pipeline (the spool, the
/// events it spooled per hour); absent where the query service runs
/// alone.
pub trait PipelineProbe: Send + Sync {
    fn read(&self) -> Option<PipelineReading>;
}

/// The alerts' part of the query service's settings.
#[derive(Clone)]
pub struct AlertSettings {
    pub config: AlertsConfig,
    /// Claims in Redis (`url`, key prefix, timeout) instead of the lake.
    pub redis: Option<(String, String, Duration)>,
    /// Names this process in the alerts it sends.
    pub source: String,
    pub probe: Option<Arc<dyn PipelineProbe>>,
}

impl std::fmt::Debug for AlertSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AlertSettings")
            .field("config", &self.config)
            .field("redis", &self.redis.as_ref().map(|r| &r.1))
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Default for AlertSettings {
    fn default() -> Self {
        Self {
            config: AlertsConfig::default(),
            redis: None,
            source: "tollgate".into(),
            probe: None,
        }
    }
}

/// `[alerts]` as written; durations in ms or s as named.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAlerts {
    evaluate_ms: Option<Spanned<u64>>,
    forecast_window_h: Option<Spanned<u32>>,
    forecast_step: Option<Spanned<f64>>,
    anomaly_factor: Option<Spanned<f64>>,
    anomaly_window_h: Option<Spanned<u32>>,
    anomaly_min_usd: Option<Spanned<f64>>,
    ingest_lag_s: Option<Spanned<u64>>,
    spool_backlog_mb: Option<Spanned<u64>>,
    dead_letters: Option<Spanned<u64>>,
    completeness_missing: Option<Spanned<f64>>,
    completeness_after_s: Option<Spanned<u64>>,
    outbox_dir: Option<PathBuf>,
    #[serde(default)]
    webhooks: Vec<Spanned<RawWebhook>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWebhook {
    url: Spanned<String>,
    format: Option<Spanned<String>>,
    secret: Option<String>,
    kinds: Option<Vec<Spanned<String>>>,
    timeout_ms: Option<u64>,
}

fn ranged<T: Copy + PartialOrd + std::fmt::Display>(
    v: &Option<Spanned<T>>,
    key: &str,
    ok: impl Fn(T) -> bool,
    what: &str,
    default: T,
) -> Result<T, Invalid> {
    match v {
        None => Ok(default),
        Some(s) if ok(*s.get_ref()) => Ok(*s.get_ref()),
        Some(s) => Err(Invalid::at(
            s.span(),
            format!("alerts.{key}"),
            format!("{} is not {what}", s.get_ref()),
        )),
    }
}

impl AlertsConfig {
    pub fn from_raw(raw: RawAlerts) -> Result<Self, Invalid> {
        let d = AlertsConfig::default();
        let positive = |x: f64| x.is_finite() && x > 0.0;
        let evaluate_ms = ranged(
            &raw.evaluate_ms,
            "evaluate_ms",
            |x| (100..=60_000).contains(&x),
            "between 100 and 60000 ms",
            2000,
        )?;
        let mut webhooks = Vec::with_capacity(raw.webhooks.len());
        for (i, w) in raw.webhooks.into_iter().enumerate() {
            let span = w.span();
            let w = w.into_inner();
            let key = |k: &str| format!("alerts.webhooks[{i}].{k}");
            let url = w.url.get_ref().trim().to_string();
            let parsed = reqwest::Url::parse(&url).ok();
            if !parsed
                .as_ref()
                .is_some_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
            {
                return Err(Invalid::at(
                    w.url.span(),
                    key("url"),
                    format!("{url:?} is not an http(s) URL"),
                ));
            }
            let format = match w.format.as_ref().map(|f| f.get_ref().as_str()) {
                None | Some("json") => Format::Json,
                Some("slack") => Format::Slack,
                Some(other) => {
                    return Err(Invalid::at(
                        w.format.as_ref().map_or(span.clone(), |f| f.span()),
                        key("format"),
                        format!("{other:?} is not \"json\" or \"slack\""),
                    ));
                }
            };
            if w.kinds.as_ref().is_some_and(Vec::is_empty) {
                return Err(Invalid::at(
                    span,
                    key("kinds"),
                    "is empty; leave it out to take every kind",
                ));
            }
            if webhooks.iter().any(|x: &Webhook| x.url == url) {
                return Err(Invalid::at(
                    w.url.span(),
                    key("url"),
                    "is the same as another webhook's",
                ));
            }
            let mut kinds = Vec::new();
            for k in w.kinds.iter().flatten() {
                let Some(kind) = Kind::ALL.into_iter().find(|x| x.as_str() == k.get_ref()) else {
                    return Err(Invalid::at(
                        k.span(),
                        key("kinds"),
                        format!(
                            "{:?} is not one of \"budget\", \"forecast\", \"anomaly\", \"pipeline\"",
                            k.get_ref()
                        ),
                    ));
                };
                kinds.push(kind);
            }
            let secret = match w.secret {
                Some(s) if s.is_empty() => {
                    return Err(Invalid::at(
                        span,
                        key("secret"),
                        "is empty; leave it out to send unsigned",
                    ));
                }
                Some(s) => Secret::new(s),
                None => None,
            };
            webhooks.push(Webhook {
                url,
                format,
                secret,
                kinds,
                timeout: Duration::from_millis(match w.timeout_ms {
                    None => 5000,
                    Some(t) if (100..=60_000).contains(&t) => t,
                    Some(t) => {
                        return Err(Invalid::at(
                            span,
                            key("timeout_ms"),
                            format!("{t} is not between 100 and 60000 ms"),
                        ));
                    }
                }),
            });
        }
        Ok(Self {
            evaluate: Duration::from_millis(evaluate_ms),
            forecast_window_h: ranged(
                &raw.forecast_window_h,
                "forecast_window_h",
                |x| (1..=24 * 31).contains(&x),
                "between 1 and 744 hours",
                d.forecast_window_h,
            )?,
            forecast_step: ranged(
                &raw.forecast_step,
                "forecast_step",
                positive,
                "a fraction above 0",
                d.forecast_step,
            )?,
            anomaly_factor: ranged(
                &raw.anomaly_factor,
                "anomaly_factor",
                |x| x.is_finite() && x > 1.0,
                "a factor above 1",
                d.anomaly_factor,
            )?,
            anomaly_window_h: ranged(
                &raw.anomaly_window_h,
                "anomaly_window_h",
                |x| (3..=24 * 14).contains(&x),
                "between 3 and 336 hours",
                d.anomaly_window_h,
            )?,
            anomaly_min_usd: ranged(
                &raw.anomaly_min_usd,
                "anomaly_min_usd",
                |x| x.is_finite() && x >= 0.0,
                "a USD amount (0 or more)",
                d.anomaly_min_usd,
            )?,
            ingest_lag_s: ranged(
                &raw.ingest_lag_s,
                "ingest_lag_s",
                |x| x > 0,
                "above 0 seconds",
                d.ingest_lag_s,
            )?,
            spool_backlog_bytes: ranged(
                &raw.spool_backlog_mb,
                "spool_backlog_mb",
                |x| x > 0 && x < 1 << 40,
                "a size in MiB above 0",
                d.spool_backlog_bytes >> 20,
            )? << 20,
            dead_letters: ranged(
                &raw.dead_letters,
                "dead_letters",
                |x| x > 0,
                "a count above 0",
                d.dead_letters,
            )?,
            completeness_missing: ranged(
                &raw.completeness_missing,
                "completeness_missing",
                |x| (0.0..1.0).contains(&x),
                "a fraction from 0 to below 1",
                d.completeness_missing,
            )?,
            completeness_after: Duration::from_secs(ranged(
                &raw.completeness_after_s,
                "completeness_after_s",
                |x| (1..=86_400).contains(&x),
                "between 1 and 86400 seconds",
                d.completeness_after.as_secs(),
            )?),
            outbox_dir: match raw.outbox_dir {
                Some(p) if p.as_os_str().is_empty() => {
                    return Err(Invalid::key(
                        "alerts.outbox_dir",
                        "is empty; leave it out for data/alerts",
                    ));
                }
                Some(p) => p,
                None => d.outbox_dir,
            },
            webhooks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AlertsConfig, Invalid> {
        let raw: RawAlerts =
            toml::from_str(text).map_err(|e| Invalid::key("alerts", e.to_string()))?;
        AlertsConfig::from_raw(raw)
    }

    #[test]
    fn defaults_apply_when_nothing_is_written() {
        let c = parse("").unwrap();
        assert_eq!(c.forecast_window_h, 6);
        assert!(c.webhooks.is_empty());
    }

    #[test]
    fn a_webhook_takes_its_kinds_format_and_secret() {
        let c = parse(
            "[[webhooks]]\nurl = \"http://127.0.0.1:9/x\"\nformat = \"slack\"\nsecret = \"s\"\nkinds = [\"budget\", \"pipeline\"]\n",
        )
        .unwrap();
        let w = &c.webhooks[0];
        assert_eq!(w.format, Format::Slack);
        assert!(w.takes(Kind::Budget) && !w.takes(Kind::Anomaly));
        assert!(w.secret.is_some());
    }

    #[test]
    fn bad_values_are_refused_with_their_key() {
        for (text, key) in [
            (
                "[[webhooks]]\nurl = \"ftp://x\"\n",
                "alerts.webhooks[0].url",
            ),
            (
                "[[webhooks]]\nurl = \"http://x\"\nformat = \"xml\"\n",
                "alerts.webhooks[0].format",
            ),
            (
                "[[webhooks]]\nurl = \"http://x\"\nkinds = [\"budgets\"]\n",
                "alerts.webhooks[0].kinds",
            ),
            ("anomaly_factor = 0.5\n", "alerts.anomaly_factor"),
            ("forecast_step = -1.0\n", "alerts.forecast_step"),
            ("evaluate_ms = 5\n", "alerts.evaluate_ms"),
            (
                "completeness_missing = 1.0\n",
                "alerts.completeness_missing",
            ),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.path, key, "{text}");
        }
        assert!(parse("colour = 1\n").is_err());
    }
}
