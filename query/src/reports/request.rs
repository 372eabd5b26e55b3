//! The reports' parameters: parsed, validated and named in every error.

use chrono::{DateTime, Duration, DurationRound, NaiveDate, TimeZone, Utc};
use datafusion::functions::core::expr_fn::get_field;
use datafusion::functions::expr_fn::coalesce;
use datafusion::logical_expr::{Expr, col};
use rust_decimal::Decimal;
use tollgate_schemas::PriceCatalog;

use crate::QueryError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Group {
    Consumer,
    Team,
    Model,
    Tag(String),
}

impl Group {
    pub(crate) fn name(&self) -> String {
        match self {
            Group::Consumer => "consumer".into(),
            Group::Team => "team".into(),
            Group::Model => "model".into(),
            Group::Tag(k) => format!("tag:{k}"),
        }
    }

    pub(crate) fn expr(&self, alias: &str) -> Expr {
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
pub(crate) fn model() -> Expr {
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
    /// Only the rows these filters take (`consumer=`, `team=`, `model=`,
    /// `tag=<key>=<value>`), on top of the caller's own access.
    pub only: Only,
}

/// Row filters a report may be narrowed with; each is an exact match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Only {
    pub consumer: Option<String>,
    pub team: Option<String>,
    /// The model that answered (`coalesce(served_model, requested_model)`),
    /// as `daily_cost` names it.
    pub model: Option<String>,
    /// A tag's key and value.
    pub tag: Option<(String, String)>,
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
    let mut only = Only::default();
    for (k, v) in params {
        let once = |slot: &Option<String>| {
            if slot.is_some() {
                return Err(bad(format!("{k} is given twice")));
            }
            Ok(Some(v.clone()))
        };
        match k.as_str() {
            "consumer" => only.consumer = once(&only.consumer)?,
            "team" => only.team = once(&only.team)?,
            "model" => only.model = once(&only.model)?,
            "tag" => {
                let (key, value) = v
                    .split_once('=')
                    .filter(|(key, _)| !key.is_empty())
                    .ok_or_else(|| bad(format!("tag={v:?}: write tag=<key>=<value>")))?;
                if only.tag.is_some() {
                    return Err(bad("tag is given twice"));
                }
                only.tag = Some((key.to_string(), value.to_string()));
            }
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
    Ok(Window {
        from,
        to,
        catalog,
        only,
    })
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
                    // Bounds keep every product in the report inside a
                    // Decimal (about 7.9e28): no GPU rents for $1M an hour.
                    if d <= Decimal::ZERO || d > Decimal::from(1_000_000) {
                        return Err(bad(format!(
                            "gpu_hour_usd={v:?}: give a positive price up to 1000000 USD per GPU-hour"
                        )));
                    }
                    gpu_hour_usd = Some(d);
                }
                "gpus" => {
                    gpus = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=1_000_000).contains(n))
                        .ok_or_else(|| {
                            bad(format!("gpus={v:?} is not an integer from 1 to 1000000"))
                        })?;
                }
                "tokens_per_s" => {
                    let t: f64 = v
                        .parse()
                        .ok()
                        .filter(|t: &f64| t.is_finite() && (0.001..=1e9).contains(t))
                        .ok_or_else(|| {
                            bad(format!(
                                "tokens_per_s={v:?} is not a number from 0.001 to 1000000000"
                            ))
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

/// The start of `t`'s hour.
pub(crate) fn hour_start(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(Duration::hours(1)).unwrap_or(t)
}

/// `t` when it is on the hour, else the start of the next hour.
pub(crate) fn next_hour(t: DateTime<Utc>) -> DateTime<Utc> {
    let start = hour_start(t);
    if start == t {
        t
    } else {
        start + Duration::hours(1)
    }
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
            (vec![("gpu_hour_usd", "2"), ("gpus", "0")], "from 1 to"),
            (vec![("gpu_hour_usd", "1000000000000000000000")], "up to"),
            (
                vec![("gpu_hour_usd", "2"), ("gpus", "4294967295")],
                "from 1 to",
            ),
            (vec![("consumer", "a"), ("consumer", "b")], "twice"),
            (vec![("tag", "novalue")], "tag=<key>=<value>"),
            (vec![("tokens_per_s", "100")], "needs gpu_hour_usd"),
        ] {
            match RoiRequest::parse(&p(&pairs), &catalogs()) {
                Err(QueryError::BadRequest(m)) => assert!(m.contains(needle), "{pairs:?}: {m}"),
                other => panic!("{pairs:?}: {other:?}"),
            }
        }
    }
}
