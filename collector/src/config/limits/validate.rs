//! The limit sections as written (`deny_unknown_fields`, so a typo is an
//! error) and their validation into the typed shapes of [`super`].

use std::time::Duration;

use chrono_tz::Tz;
use serde::Deserialize;
use tollgate_schemas::Usd;
use tollgate_schemas::config::{Invalid, Secret};
use toml::Spanned;

use super::*;

/// `[redis]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    url: Spanned<String>,
    timeout_ms: Option<u64>,
    prefix: Option<String>,
    reconcile_s: Option<u64>,
}

/// `on_limit` / `on_exhausted`: a word or `{ fallback = "m" }`.
#[derive(Debug, Deserialize)]
#[serde(
    untagged,
    expecting = "on_limit: \"reject\" or { fallback = \"<model>\" }; on_exhausted: \"block\", \"alert_only\" or { downgrade = \"<model>\" } (no other keys)"
)]
enum RawAction {
    Word(String),
    Fallback(FallbackTo),
    Downgrade(DowngradeTo),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FallbackTo {
    fallback: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DowngradeTo {
    downgrade: String,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawUsd {
    Text(String),
    Integer(i64),
    Float(f64),
}

impl RawUsd {
    fn parse(&self) -> Result<Usd, String> {
        let text = match self {
            RawUsd::Text(s) => s.clone(),
            RawUsd::Integer(i) => i.to_string(),
            RawUsd::Float(f) => f.to_string(),
        };
        let usd: Usd = text
            .trim()
            .parse()
            .map_err(|e| format!("bad dollar amount {text:?}: {e}"))?;
        if usd < Usd::ZERO {
            return Err("must not be negative".into());
        }
        if usd.decimal().scale() > Usd::SCALE {
            return Err(format!(
                "{text:?} has more than {} decimal places",
                Usd::SCALE
            ));
        }
        if scaled(usd).is_none() {
            return Err(format!("is too large (at most {})", max_usd()));
        }
        Ok(usd)
    }
}

/// One `[[rate_limits]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    name: String,
    model: Option<String>,
    consumer: Option<String>,
    team: Option<String>,
    tag: Option<String>,
    #[serde(default)]
    exempt: Vec<String>,
    key: Option<String>,
    #[serde(rename = "match")]
    matches: Option<OneOrMany>,
    shared: Option<bool>,
    count: Option<String>,
    default_output_tokens: Option<u64>,
    on_limit: Option<RawAction>,
    tokens_per_second: Option<i64>,
    tokens_per_minute: Option<i64>,
    tokens_per_hour: Option<i64>,
    tokens_per_day: Option<i64>,
    requests_per_second: Option<i64>,
    requests_per_minute: Option<i64>,
    requests_per_hour: Option<i64>,
    requests_per_day: Option<i64>,
    usd_per_second: Option<RawUsd>,
    usd_per_minute: Option<RawUsd>,
    usd_per_hour: Option<RawUsd>,
    usd_per_day: Option<RawUsd>,
}

/// One `[[budgets]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBudget {
    name: String,
    model: Option<String>,
    consumer: Option<String>,
    team: Option<String>,
    tag: Option<String>,
    #[serde(default)]
    exempt: Vec<String>,
    usd: RawUsd,
    period: Option<String>,
    timezone: Option<String>,
    alert_at: Option<Vec<f64>>,
    on_exhausted: Option<RawAction>,
    default_output_tokens: Option<u64>,
}

/// Validates the three sections; names are unique across rules and budgets
/// (they key counters and show in `limit_key`).
pub fn validate(
    redis: Option<RawRedis>,
    rate_limits: &[Spanned<RawRateLimit>],
    budgets: &[Spanned<RawBudget>],
) -> Result<LimitsConfig, Invalid> {
    let redis = redis.map(validate_redis).transpose()?;
    let mut names: Vec<String> = Vec::new();
    let mut claim = |name: &str, span: std::ops::Range<usize>, path: String| {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !ok {
            return Err(Invalid::at(
                span,
                path,
                "must be 1 to 64 characters of letters, digits, '-', '_' or '.'",
            ));
        }
        if names.iter().any(|n| n == name) {
            return Err(Invalid::at(
                span,
                path,
                format!("{name:?} names two rules or budgets"),
            ));
        }
        names.push(name.to_string());
        Ok(())
    };
    let mut rates = Vec::new();
    for (i, spanned) in rate_limits.iter().enumerate() {
        let at = |field: &str, m: String| {
            Invalid::at(spanned.span(), format!("rate_limits[{i}]{field}"), m)
        };
        let r = spanned.get_ref();
        claim(&r.name, spanned.span(), format!("rate_limits[{i}].name"))?;
        rates.push(rate_limit(r, &at)?);
    }
    let mut out = Vec::new();
    for (i, spanned) in budgets.iter().enumerate() {
        let at =
            |field: &str, m: String| Invalid::at(spanned.span(), format!("budgets[{i}]{field}"), m);
        let b = spanned.get_ref();
        claim(&b.name, spanned.span(), format!("budgets[{i}].name"))?;
        out.push(budget(b, &at)?);
    }
    Ok(LimitsConfig {
        redis,
        rate_limits: rates,
        budgets: out,
    })
}

fn validate_redis(r: RawRedis) -> Result<RedisConfig, Invalid> {
    let url = r.url.get_ref().trim();
    let refuse = |m: &str| Err(Invalid::at(r.url.span(), "redis.url", m));
    if url.starts_with("rediss://") {
        return refuse("TLS (rediss://) is not supported; use redis:// on a trusted network");
    }
    if !["redis://", "redis+unix://", "unix://"]
        .iter()
        .any(|s| url.starts_with(s))
    {
        return refuse("must be a redis:// URL");
    }
    if redis::Client::open(url).is_err() {
        return refuse("is not a usable Redis URL (redis://[user:password@]host:port/db)");
    }
    let timeout_ms = r.timeout_ms.unwrap_or(100);
    if !(1..=60_000).contains(&timeout_ms) {
        return Err(Invalid::key(
            "redis.timeout_ms",
            "must be 1 to 60000 milliseconds",
        ));
    }
    let prefix = r.prefix.unwrap_or_else(|| "tollgate".into());
    if prefix.is_empty() || prefix.len() > 64 || prefix.contains(char::is_whitespace) {
        return Err(Invalid::key(
            "redis.prefix",
            "must be 1 to 64 characters without spaces",
        ));
    }
    let reconcile_s = r.reconcile_s.unwrap_or(300);
    if !(1..=86_400).contains(&reconcile_s) {
        return Err(Invalid::key(
            "redis.reconcile_s",
            "must be 1 to 86400 seconds",
        ));
    }
    Ok(RedisConfig {
        reconcile: Duration::from_secs(reconcile_s),
        url: Secret::new(url.to_string())
            .ok_or_else(|| Invalid::key("redis.url", "must not be empty"))?,
        timeout: Duration::from_millis(timeout_ms),
        prefix,
    })
}

type At<'a> = &'a dyn Fn(&str, String) -> Invalid;

#[allow(clippy::too_many_arguments)]
fn scope(
    model: &Option<String>,
    consumer: &Option<String>,
    team: &Option<String>,
    tag: &Option<String>,
    exempt: &[String],
    at: At,
) -> Result<Scope, Invalid> {
    let pattern = |field: &str, v: &Option<String>| {
        v.as_deref()
            .map(|g| glob::Pattern::new(g).map_err(|e| at(field, format!("bad glob {g:?}: {e}"))))
            .transpose()
    };
    let tag = match tag {
        None => None,
        Some(t) => {
            let Some((k, g)) = t.split_once('=') else {
                return Err(at(".tag", "must be key=value (a glob)".into()));
            };
            let g = glob::Pattern::new(g.trim())
                .map_err(|e| at(".tag", format!("bad glob {g:?}: {e}")))?;
            Some((k.trim().to_string(), g))
        }
    };
    Ok(Scope {
        model: pattern(".model", model)?,
        consumer: pattern(".consumer", consumer)?,
        team: pattern(".team", team)?,
        tag,
        exempt: exempt.to_vec(),
    })
}

fn count(raw: &Option<String>, at: At) -> Result<Count, Invalid> {
    match raw.as_deref() {
        None | Some("total") => Ok(Count::Total),
        Some("input") => Ok(Count::Input),
        Some("output") => Ok(Count::Output),
        Some(other) => Err(at(
            ".count",
            format!("{other:?} is not one of total, input, output"),
        )),
    }
}

fn rate_limit(r: &RawRateLimit, at: At) -> Result<RateLimitConfig, Invalid> {
    let scope = scope(&r.model, &r.consumer, &r.team, &r.tag, &r.exempt, at)?;
    let key_text = r.key.as_deref().unwrap_or("consumer");
    let key = KeySource::parse(key_text).ok_or_else(|| {
        at(
            ".key",
            format!(
                "{key_text:?} is not one of consumer, team, global, ip, header:<name>, query:<param>, cookie:<name>, tag:<key>"
            ),
        )
    })?;
    if let KeySource::Header(name) = &key
        && http::HeaderName::from_bytes(name.as_bytes()).is_err()
    {
        return Err(at(".key", format!("{name:?} is not a header name")));
    }
    if let KeySource::Cookie(name) | KeySource::Query(name) | KeySource::Tag(name) = &key
        && name.contains(|c: char| "=;,&".contains(c) || c.is_whitespace() || c.is_control())
    {
        return Err(at(
            ".key",
            format!("{name:?} cannot name a cookie, query parameter or tag"),
        ));
    }
    let patterns = match &r.matches {
        None => Vec::new(),
        Some(OneOrMany::One(p)) => vec![p.clone()],
        Some(OneOrMany::Many(ps)) => ps.clone(),
    };
    let mut matches = Vec::new();
    for p in &patterns {
        let m = if let Some(re) = p.strip_prefix("regexp:") {
            ValueMatch::Regex(
                regex::Regex::new(re).map_err(|e| at(".match", format!("bad regexp: {e}")))?,
            )
        } else if key == KeySource::Ip && p.contains('/') {
            ValueMatch::Cidr(
                p.parse()
                    .map_err(|e| at(".match", format!("bad CIDR {p:?}: {e}")))?,
            )
        } else {
            ValueMatch::Glob(
                glob::Pattern::new(p).map_err(|e| at(".match", format!("bad glob {p:?}: {e}")))?,
            )
        };
        matches.push(m);
    }
    if r.shared == Some(true) && matches.is_empty() {
        return Err(at(
            ".shared",
            "needs `match`: shared counts the matching values together".into(),
        ));
    }
    let mut limits = Vec::new();
    let ints = [
        (Unit::Tokens, Window::Second, r.tokens_per_second),
        (Unit::Tokens, Window::Minute, r.tokens_per_minute),
        (Unit::Tokens, Window::Hour, r.tokens_per_hour),
        (Unit::Tokens, Window::Day, r.tokens_per_day),
        (Unit::Requests, Window::Second, r.requests_per_second),
        (Unit::Requests, Window::Minute, r.requests_per_minute),
        (Unit::Requests, Window::Hour, r.requests_per_hour),
        (Unit::Requests, Window::Day, r.requests_per_day),
    ];
    for (unit, window, v) in ints {
        if let Some(v) = v {
            let field = format!(".{}_per_{}", unit.as_str(), window.as_str());
            if v < 0 {
                return Err(at(&field, "must not be negative".into()));
            }
            if v > 1 << 53 {
                return Err(at(
                    &field,
                    format!("is too large (at most {})", 1_i64 << 53),
                ));
            }
            limits.push(RateLimit {
                unit,
                window,
                limit: v,
            });
        }
    }
    let usds = [
        (Window::Second, &r.usd_per_second),
        (Window::Minute, &r.usd_per_minute),
        (Window::Hour, &r.usd_per_hour),
        (Window::Day, &r.usd_per_day),
    ];
    for (window, v) in usds {
        if let Some(v) = v {
            let field = format!(".usd_per_{}", window.as_str());
            let usd = v.parse().map_err(|m| at(&field, m))?;
            limits.push(RateLimit {
                unit: Unit::Usd,
                window,
                limit: scaled(usd)
                    .ok_or_else(|| at(&field, format!("is too large (at most {})", max_usd())))?,
            });
        }
    }
    if limits.is_empty() {
        return Err(at(
            "",
            "needs at least one of {tokens, requests, usd}_per_{second, minute, hour, day}".into(),
        ));
    }
    let on_limit = match &r.on_limit {
        None => OnLimit::Reject,
        Some(RawAction::Word(w)) if w == "reject" => OnLimit::Reject,
        Some(RawAction::Fallback(FallbackTo { fallback })) if !fallback.is_empty() => {
            OnLimit::Fallback(fallback.clone())
        }
        _ => {
            return Err(at(
                ".on_limit",
                "must be \"reject\" or { fallback = \"<model>\" }".into(),
            ));
        }
    };
    Ok(RateLimitConfig {
        name: r.name.clone(),
        scope,
        key,
        matches,
        shared: r.shared.unwrap_or(false),
        limits,
        count: count(&r.count, at)?,
        default_output_tokens: r.default_output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS),
        on_limit,
    })
}

fn budget(b: &RawBudget, at: At) -> Result<BudgetConfig, Invalid> {
    let scope = scope(&b.model, &b.consumer, &b.team, &b.tag, &b.exempt, at)?;
    let usd = b.usd.parse().map_err(|m| at(".usd", m))?;
    let period = match b.period.as_deref() {
        None => Period::Month,
        Some(p) => Period::parse(p)
            .ok_or_else(|| at(".period", format!("{p:?} is not one of day, week, month")))?,
    };
    let timezone = match b.timezone.as_deref() {
        None => Tz::UTC,
        Some(name) => name.parse().map_err(|_| {
            at(
                ".timezone",
                format!("{name:?} is not an IANA time zone name (like Asia/Shanghai)"),
            )
        })?,
    };
    let alert_at = b.alert_at.clone().unwrap_or_default();
    if alert_at
        .iter()
        .any(|f| !(f.is_finite() && *f > 0.0 && *f <= 1.0))
    {
        return Err(at(
            ".alert_at",
            "each fraction must be above 0 and at most 1".into(),
        ));
    }
    let on_exhausted = match &b.on_exhausted {
        None => OnExhausted::Block,
        Some(RawAction::Word(w)) if w == "block" => OnExhausted::Block,
        Some(RawAction::Word(w)) if w == "alert_only" => OnExhausted::AlertOnly,
        Some(RawAction::Downgrade(DowngradeTo { downgrade })) if !downgrade.is_empty() => {
            OnExhausted::Downgrade(downgrade.clone())
        }
        _ => {
            return Err(at(
                ".on_exhausted",
                "must be \"block\", \"alert_only\" or { downgrade = \"<model>\" }".into(),
            ));
        }
    };
    Ok(BudgetConfig {
        name: b.name.clone(),
        scope,
        usd,
        period,
        timezone,
        alert_at,
        on_exhausted,
        default_output_tokens: b.default_output_tokens.unwrap_or(DEFAULT_OUTPUT_TOKENS),
    })
}

/// Every name a rule or budget filters on must exist: a typo would
/// otherwise leave the rule taking nothing, silently.
pub fn check_references(
    limits: &LimitsConfig,
    routes: &[crate::config::RouteConfig],
    consumers: &[crate::config::ConsumerConfig],
) -> Result<(), Invalid> {
    let scopes = (limits.rate_limits.iter().enumerate())
        .map(|(i, r)| (format!("rate_limits[{i}]"), &r.scope))
        .chain(
            (limits.budgets.iter().enumerate()).map(|(i, b)| (format!("budgets[{i}]"), &b.scope)),
        );
    for (path, s) in scopes {
        let none = |field: &str, what: String| Err(Invalid::key(format!("{path}.{field}"), what));
        if let Some(g) = &s.consumer
            && !consumers.iter().any(|c| g.matches(&c.name))
        {
            return none(
                "consumer",
                format!("{:?} matches no configured consumer", g.as_str()),
            );
        }
        if let Some(g) = &s.team
            && !consumers
                .iter()
                .any(|c| c.team.as_deref().is_some_and(|t| g.matches(t)))
        {
            return none(
                "team",
                format!("{:?} matches no configured consumer's team", g.as_str()),
            );
        }
        if let Some(e) = s
            .exempt
            .iter()
            .find(|e| !consumers.iter().any(|c| c.name == **e))
        {
            return none("exempt", format!("{e:?} is not a configured consumer"));
        }
        if let Some(g) = &s.model {
            let routed = routes.iter().any(|r| {
                g.matches(&r.model)
                    || r.model == g.as_str()
                    || glob::Pattern::new(&r.model).is_ok_and(|p| p.matches(g.as_str()))
            });
            if !routed {
                return none("model", format!("{:?} matches no route", g.as_str()));
            }
        }
    }
    Ok(())
}

/// The largest dollar amount a limit or budget may be (see [`scaled`]).
fn max_usd() -> Usd {
    Usd::from_scaled(1 << 53).unwrap_or(Usd::ZERO)
}
