//! `[redis]`, `[[rate_limits]]` and `[[budgets]]`: what each consumer,
//! team, key or tag may spend, in tokens, requests and US dollars, and what
//! happens when a limit trips. Key sources follow Higress's
//! `ai-token-ratelimit` (header, query parameter, client IP, cookie,
//! consumer), plus team, tag and one global counter.

use std::time::Duration;

use chrono_tz::Tz;
use tollgate_schemas::Usd;
use tollgate_schemas::config::Secret;
pub use tollgate_schemas::period::Period;

mod validate;

pub use validate::{RawBudget, RawRateLimit, RawRedis, check_references, validate};

/// Every limit section, validated.
#[derive(Debug, Clone, Default)]
pub struct LimitsConfig {
    /// `None`: counters live in this process only.
    pub redis: Option<RedisConfig>,
    pub rate_limits: Vec<RateLimitConfig>,
    pub budgets: Vec<BudgetConfig>,
}

impl LimitsConfig {
    /// Models the rules send requests to when they trip, for checking that
    /// each one has a route.
    pub fn fallback_models(&self) -> impl Iterator<Item = (String, &str)> {
        let rates = self.rate_limits.iter().enumerate().filter_map(|(i, r)| {
            r.on_limit
                .fallback()
                .map(|m| (format!("rate_limits[{i}].on_limit.fallback"), m))
        });
        let budgets = self.budgets.iter().enumerate().filter_map(|(i, b)| {
            b.on_exhausted
                .fallback()
                .map(|m| (format!("budgets[{i}].on_exhausted.downgrade"), m))
        });
        rates.chain(budgets)
    }
}

/// Shared counters for several gateways.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port/db`; may hold a password, so it
    /// is never logged.
    pub url: Secret,
    /// Longest wait for one admission round trip before this gateway goes
    /// on with its local counters (default 100 ms).
    pub timeout: Duration,
    /// Prefix of every key Tollgate writes (default `tollgate`).
    pub prefix: String,
    /// How often budgets' shared counters are compared with the ledger
    /// (default 300 s).
    pub reconcile: Duration,
}

/// Which requests a rule or budget applies to; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Glob on the model the client asked for.
    pub model: Option<glob::Pattern>,
    pub consumer: Option<glob::Pattern>,
    pub team: Option<glob::Pattern>,
    /// `key=glob` on the request's `x-tollgate-tags`.
    pub tag: Option<(String, glob::Pattern)>,
    /// Consumers this rule never applies to (none unless the rule says so).
    pub exempt: Vec<String>,
}

/// What one counter of a rate limit is keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    Consumer,
    Team,
    /// One counter for every matching request.
    Global,
    /// The client IP as `[gateway] client_ip_header` or the peer gives it.
    Ip,
    /// A request header (name lower-cased).
    Header(String),
    /// A URL query parameter.
    Query(String),
    Cookie(String),
    /// A tag of `x-tollgate-tags`.
    Tag(String),
}

impl KeySource {
    /// The key as the config writes it (`header:x-user`).
    pub fn as_config(&self) -> String {
        match self {
            Self::Consumer => "consumer".into(),
            Self::Team => "team".into(),
            Self::Global => "global".into(),
            Self::Ip => "ip".into(),
            Self::Header(n) => format!("header:{n}"),
            Self::Query(n) => format!("query:{n}"),
            Self::Cookie(n) => format!("cookie:{n}"),
            Self::Tag(n) => format!("tag:{n}"),
        }
    }

    pub(crate) fn parse(s: &str) -> Option<Self> {
        let named = |rest: &str| (!rest.is_empty()).then(|| rest.to_string());
        Some(match s {
            "consumer" => Self::Consumer,
            "team" => Self::Team,
            "global" => Self::Global,
            "ip" => Self::Ip,
            _ => match s.split_once(':')? {
                ("header", n) => Self::Header(named(n)?.to_ascii_lowercase()),
                ("query", n) => Self::Query(named(n)?),
                ("cookie", n) => Self::Cookie(named(n)?),
                ("tag", n) => Self::Tag(named(n)?),
                _ => return None,
            },
        })
    }
}

/// Which key values are counted: all of them (one counter each), or only
/// those matching one of the patterns.
#[derive(Debug, Clone)]
pub enum ValueMatch {
    Glob(glob::Pattern),
    /// Written `regexp:<pattern>`, as in Higress.
    Regex(regex::Regex),
    /// For `key = "ip"`: an address range.
    Cidr(ipnet::IpNet),
}

impl ValueMatch {
    /// The pattern as the config writes it.
    pub fn as_config(&self) -> String {
        match self {
            Self::Glob(g) => g.as_str().to_string(),
            Self::Regex(r) => format!("regexp:{}", r.as_str()),
            Self::Cidr(n) => n.to_string(),
        }
    }
}

/// What a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Unit {
    Tokens,
    Requests,
    /// US dollars, priced with the catalog entry in force.
    Usd,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Tokens => "tokens",
            Unit::Requests => "requests",
            Unit::Usd => "usd",
        }
    }
}

/// A rolling window's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Second,
    Minute,
    Hour,
    Day,
}

impl Window {
    pub fn length(self) -> Duration {
        Duration::from_secs(match self {
            Window::Second => 1,
            Window::Minute => 60,
            Window::Hour => 3600,
            Window::Day => 86_400,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Window::Second => "second",
            Window::Minute => "minute",
            Window::Hour => "hour",
            Window::Day => "day",
        }
    }
}

/// One `{unit}_per_{window}` figure. USD amounts are in units of
/// 10^-10 dollars ([`Usd::to_scaled`]), as the ledger counts them.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub unit: Unit,
    pub window: Window,
    pub limit: i64,
}

/// Which tokens a token figure counts (USD figures count the whole cost).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Count {
    /// Input (cached included) plus output (reasoning included).
    #[default]
    Total,
    Input,
    Output,
}

impl Count {
    pub fn as_str(self) -> &'static str {
        match self {
            Count::Total => "total",
            Count::Input => "input",
            Count::Output => "output",
        }
    }
}

/// What a tripped rate limit does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnLimit {
    /// 429 `rate_limit_exceeded`.
    Reject,
    /// The request is served by this model (its own rules apply).
    Fallback(String),
}

impl OnLimit {
    pub fn fallback(&self) -> Option<&str> {
        match self {
            OnLimit::Fallback(m) => Some(m),
            OnLimit::Reject => None,
        }
    }
}

/// One `[[rate_limits]]` rule.
#[derive(Debug, Clone)]
pub struct RateLimitConfig {
    pub name: String,
    pub scope: Scope,
    pub key: KeySource,
    /// Empty: every value of the key, one counter each.
    pub matches: Vec<ValueMatch>,
    /// With `matches`: all matching values share one counter.
    pub shared: bool,
    pub limits: Vec<RateLimit>,
    pub count: Count,
    /// Output reserved for a request without `max_tokens` (tokens).
    pub default_output_tokens: u64,
    pub on_limit: OnLimit,
}

/// What a spent budget does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnExhausted {
    /// 429 `budget_exceeded`.
    Block,
    /// Requests go on; the alerts feature tells someone.
    AlertOnly,
    /// The request is served by this model instead.
    Downgrade(String),
}

impl OnExhausted {
    pub fn fallback(&self) -> Option<&str> {
        match self {
            OnExhausted::Downgrade(m) => Some(m),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            OnExhausted::Block => "block",
            OnExhausted::AlertOnly => "alert_only",
            OnExhausted::Downgrade(_) => "downgrade",
        }
    }
}

/// One `[[budgets]]` entry: a dollar amount per calendar period.
#[derive(Debug, Clone)]
pub struct BudgetConfig {
    pub name: String,
    pub scope: Scope,
    pub usd: Usd,
    pub period: Period,
    pub timezone: Tz,
    /// Fractions of `usd` (0 < f <= 1) at which the alerts feature fires.
    pub alert_at: Vec<f64>,
    pub on_exhausted: OnExhausted,
    /// Output priced into the reservation of a request without `max_tokens`.
    pub default_output_tokens: u64,
}

/// Output reserved for a request without `max_tokens`, unless a rule says
/// otherwise: a long chat answer (tokens).
pub const DEFAULT_OUTPUT_TOKENS: u64 = 1024;

/// `usd` in 10^-10 dollars, if it fits the counters (about $900,000: Redis
/// scripts sum in doubles, exact to 2^53).
pub fn scaled(usd: Usd) -> Option<i64> {
    const MAX: i128 = 1 << 53;
    let units = usd.to_scaled();
    (units <= MAX).then_some(units as i64)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = r#"
        [upstreams.sim]
        kind = "simulated"
        [[routes]]
        model = "deepseek-r1"
        targets = [{ upstream = "sim" }]
        [[routes]]
        model = "qwq-32b"
        targets = [{ upstream = "sim" }]
    "#;

    fn parse(extra: &str) -> Result<Config, String> {
        let consumers = crate::policy::quota::tests::CONSUMERS;
        Config::from_toml(&format!("{BASE}\n{consumers}\n{extra}")).map_err(|e| e.0)
    }

    #[test]
    fn the_issue_contract_parses() {
        let c = parse(
            r#"
            [redis]
            url = "redis://127.0.0.1:6379/0"
            [[rate_limits]]
            name = "r1-tokens"
            model = "deepseek-r1"
            key = "consumer"
            tokens_per_minute = 20000
            on_limit = { fallback = "qwq-32b" }
            [[rate_limits]]
            name = "by-ip"
            key = "ip"
            match = ["10.0.0.0/8", "regexp:^192\\.168\\."]
            requests_per_second = 5
            usd_per_day = "1.50"
            [[budgets]]
            name = "search-monthly"
            team = "search"
            usd = "500.00"
            period = "month"
            timezone = "Asia/Shanghai"
            alert_at = [0.5, 0.8, 1.0]
            on_exhausted = "block"
        "#,
        )
        .unwrap();
        let l = &c.limits;
        assert!(l.redis.is_some());
        assert_eq!(l.rate_limits[0].limits[0].limit, 20000);
        assert_eq!(l.rate_limits[0].on_limit.fallback(), Some("qwq-32b"));
        assert_eq!(l.rate_limits[1].matches.len(), 2);
        assert_eq!(l.rate_limits[1].limits[1].limit, 15_000_000_000);
        assert_eq!(l.budgets[0].timezone, chrono_tz::Asia::Shanghai);
    }

    #[test]
    fn mistakes_are_refused_with_their_key() {
        let cases = [
            (
                "[[rate_limits]]\nname = \"a\"\nkey = \"consumer\"",
                "at least one",
            ),
            (
                "[[rate_limits]]\nname = \"a\"\nkey = \"cookie:\"\nrequests_per_day = 1",
                "rate_limits[0].key",
            ),
            (
                "[[rate_limits]]\nname = \"a\"\nrequests_per_day = 1\non_limit = { fallback = \"nope\" }",
                "no route",
            ),
            (
                "[[rate_limits]]\nname = \"a\"\nrequests_per_day = 1\n[[budgets]]\nname = \"a\"\nusd = 1",
                "names two",
            ),
            (
                "[[budgets]]\nname = \"b\"\nusd = 1\ntimezone = \"Mars/Olympus\"",
                "IANA",
            ),
            ("[[budgets]]\nname = \"b\"\nusd = \"-1\"", "negative"),
            (
                "[[budgets]]\nname = \"b\"\nusd = 1\nalert_at = [1.5]",
                "alert_at",
            ),
            (
                "[[budgets]]\nname = \"b\"\nusd = 1\nperiod = \"year\"",
                "period",
            ),
            (
                "[[budgets]]\nname = \"b\"\nusd = 1\ncolor = 1",
                "unknown field",
            ),
            (
                "[[rate_limits]]\nname = \"a\"\nrequests_per_day = 1\nmatch = \"regexp:(\"",
                "bad regexp",
            ),
            ("[redis]\nurl = \"http://x\"", "redis.url"),
            ("[redis]\nurl = \"rediss://x:1\"", "TLS"),
            ("[redis]\nurl = \"redis://127.0.0.1:notaport/0\"", "usable"),
            (
                "[[rate_limits]]\nname = \"a\"\nconsumer = \"alcie\"\nrequests_per_day = 1",
                "matches no configured consumer",
            ),
            (
                "[[budgets]]\nname = \"b\"\nusd = 1\nteam = \"serch\"",
                "team",
            ),
            (
                "[[budgets]]\nname = \"b\"\nusd = 1\nexempt = [\"nobody\"]",
                "not a configured consumer",
            ),
            (
                "[[budgets]]\nname = \"b\"\nusd = 1\nmodel = \"deepseek-r2\"",
                "matches no route",
            ),
            (
                "[[rate_limits]]\nname = \"a\"\nrequests_per_day = 1\non_limit = { fallback = \"qwq-32b\", extra = 1 }",
                "on_limit",
            ),
            (
                "[[rate_limits]]\nname = \"a\"\nkey = \"header:x user\"\nrequests_per_day = 1",
                "key",
            ),
            (
                "[[budgets]]\nname = \"b\"\nusd = \"0.000000000001\"",
                "decimal places",
            ),
            ("[[budgets]]\nname = \"b\"\nusd = \"1000000\"", "at most"),
            (
                "[[rate_limits]]\nname = \"a\"\nkey = \"cookie:a;b\"\nrequests_per_day = 1",
                "cannot name",
            ),
            (
                "[[rate_limits]]\nname = \"a\"\ntokens_per_day = 9223372036854775807",
                "at most 9007199254740992",
            ),
        ];
        for (text, needle) in cases {
            let e = parse(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
