//! Token, request and dollar limits and budgets, enforced by one
//! reserve-then-settle engine.
//!
//! Before any upstream attempt, [`Quota::admit`] reserves the request's
//! estimate in every counter of every rule that applies (the counted input
//! tokens plus `max_tokens`, or the rule's default, priced with the catalog
//! for dollar figures): all at once, or nothing when one would go over, in
//! which case the rule's action says what happens (a 429 or a cheaper
//! model). When the request ends, however it ends, its [`Grant`] settles
//! each reservation to what every attempt actually used, so the counters
//! equal the ledger.
//!
//! Its parts: [`rules`] (which requests a rule takes and which counter they
//! land in), [`span`] (rolling windows and calendar periods), [`local`]
//! (counters in this process) and [`shared`] (counters in Redis, for
//! several gateways, kept by [`scripts`]), then [`view`] (`GET
//! /v1/limits`) and [`rebuild`] (budgets' spend from the ledger on start,
//! and their reconciliation with Redis).

pub mod local;
pub mod rebuild;
pub mod rules;
pub mod scripts;
pub mod shared;
pub mod span;
pub mod view;

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tollgate_schemas::Usd;

use crate::config::LimitsConfig;
use crate::config::limits::{Count, Unit, scaled};
pub use local::{Figures, Local, Over, Take};
pub use rules::{Action, Ask, Kind, Rule};
pub use shared::{Op, Shared, SharedError};
use span::Span;

/// The largest amount one request reserves (tokens, requests or 10^-10
/// USD): the largest limit a config can write ([`scaled`]'s bound), so an
/// estimate capped here is still over every limit, and counters that add
/// such amounts saturate instead of wrapping.
pub const MAX_AMOUNT: i64 = 1 << 53;

/// The engine's clock; tests move it across period boundaries.
pub type Clock = Arc<dyn Fn() -> DateTime<Utc> + Send + Sync>;

/// What an admission needs to estimate a request.
pub struct Estimate<'a> {
    /// The request's input tokens, counted on first use only.
    pub input: &'a (dyn Fn() -> u64 + Sync),
    /// `max_completion_tokens` / `max_tokens`, if the client set one.
    pub max_tokens: Option<u64>,
    /// Answers asked for (`n`, `best_of`, prompts): each may use
    /// `max_tokens`.
    pub choices: u64,
    /// The price of (input, output) tokens on the model that will serve.
    pub price: &'a (dyn Fn(u64, u64) -> Option<Usd> + Sync),
}

/// What a finished request used, over all its attempts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Spent {
    /// Tokens, cached included.
    pub input: u64,
    /// Tokens, reasoning included.
    pub output: u64,
    /// `None` when a model had no price.
    pub cost: Option<Usd>,
}

/// One reservation held by a request.
#[derive(Debug)]
struct Hold {
    limit: usize,
    key: Box<str>,
    bucket: i64,
    amount: i64,
    /// The Redis key, when the reservation is there.
    shared: Option<Arc<str>>,
    keep_ms: i64,
}

/// The headers OpenAI sends for the tightest limit of a kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Headroom {
    pub limit: i64,
    pub remaining: i64,
    pub reset: Duration,
}

/// `x-ratelimit-*` for tokens and requests.
#[derive(Debug, Clone, Copy, Default)]
pub struct RateHeaders {
    pub tokens: Option<Headroom>,
    pub requests: Option<Headroom>,
}

/// An admitted request's reservations; settles when the request ends
/// (on drop, to nothing used, if it never said what it used).
pub struct Grant {
    quota: Option<Arc<Quota>>,
    holds: Vec<Hold>,
    pub headers: RateHeaders,
}

/// A rule that would go over.
#[derive(Debug, Clone)]
pub struct Trip {
    pub rule: Arc<str>,
    pub kind: Kind,
    /// `<rule>:<key value>`, as the event's `limit_key` says it.
    pub limit_key: String,
    pub action: Action,
    /// When a retry can fit (the window's length if it never can).
    pub retry_after: Duration,
    /// The request's estimate alone is over the limit: no retry fits.
    pub never: bool,
    /// What the request needed and the limit, in the limit's unit.
    pub needed: i64,
    pub limit: i64,
    pub unit: Unit,
    /// `minute`, `month`, ...
    pub window: &'static str,
    pub headers: RateHeaders,
}

pub enum Admission {
    Granted(Grant),
    Tripped(Trip),
}

pub struct Quota {
    rules: Vec<Rule>,
    /// (rule, limit within it) for each limit, numbered in rule order.
    limits: Vec<(usize, usize)>,
    local: Local,
    shared: Option<Arc<Shared>>,
    ip_header: Option<String>,
    clock: Clock,
    drift: rebuild::Drift,
    /// With Redis: each limit's key up to its value.
    redis_prefixes: Vec<String>,
}

impl std::fmt::Debug for Quota {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Quota")
            .field("rules", &self.rules.len())
            .field("shared", &self.shared.is_some())
            .finish()
    }
}

impl Quota {
    /// The engine for `config`; with `[redis]`, its connection starts on
    /// the current Tokio runtime.
    pub fn new(
        config: &LimitsConfig,
        ip_header: Option<String>,
        clock: Clock,
    ) -> Result<Self, SharedError> {
        let rules = rules::compile(config);
        let limits: Vec<(usize, usize)> = rules
            .iter()
            .enumerate()
            .flat_map(|(r, rule)| (0..rule.limits.len()).map(move |l| (r, l)))
            .collect();
        let shared = match &config.redis {
            Some(r) if !rules.is_empty() => {
                let budgets = rules.iter().any(|r| r.kind == Kind::Budget);
                Some(Shared::start(r, budgets)?)
            }
            _ => None,
        };
        let redis_prefixes = match &shared {
            Some(s) => (limits.iter())
                .map(|&(r, l)| {
                    let (rule, lim) = (&rules[r], &rules[r].limits[l]);
                    s.key(&rule.name, lim.unit.as_str(), lim.span.name(), "")
                })
                .collect(),
            None => Vec::new(),
        };
        Ok(Self {
            local: Local::new(limits.len()),
            rules,
            limits,
            shared,
            ip_header,
            clock,
            drift: rebuild::Drift::default(),
            redis_prefixes,
        })
    }

    /// Whether any rule is configured (no rule: admission is free).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn shared(&self) -> Option<&Arc<Shared>> {
        self.shared.as_ref()
    }

    pub fn now(&self) -> DateTime<Utc> {
        (self.clock)()
    }

    fn limit(&self, id: usize) -> Option<(&Rule, &rules::Limit)> {
        let (r, l) = *self.limits.get(id)?;
        let rule = self.rules.get(r)?;
        Some((rule, rule.limits.get(l)?))
    }

    /// Reserves `estimate` in every counter `ask` lands in, or trips on the
    /// first one that would go over.
    pub async fn admit(self: &Arc<Self>, ask: &Ask<'_>, estimate: &Estimate<'_>) -> Admission {
        if self.rules.is_empty() {
            return Admission::Granted(Grant::empty());
        }
        let now = self.now();
        let input = OnceLock::new();
        let input = || *input.get_or_init(|| (estimate.input)());
        // (output tokens, price): rules with the same output estimate share one.
        let mut priced: Option<(u64, i64)> = None;
        let mut keys: Vec<std::borrow::Cow<str>> = Vec::new();
        let mut takes: Vec<Take> = Vec::new();
        let mut id = 0;
        for rule in &self.rules {
            let first = id;
            id += rule.limits.len();
            if !rule.applies(ask) {
                continue;
            }
            let Some(key) = rule.key(ask, self.ip_header.as_deref()) else {
                continue;
            };
            let output = (estimate.max_tokens.unwrap_or(rule.default_output_tokens))
                .saturating_mul(estimate.choices.max(1));
            for (i, l) in rule.limits.iter().enumerate() {
                let amount = match l.unit {
                    Unit::Requests => 1,
                    Unit::Tokens => {
                        let n = match rule.count {
                            Count::Total => input().saturating_add(output),
                            Count::Input => input(),
                            Count::Output => output,
                        };
                        i64::try_from(n).unwrap_or(MAX_AMOUNT)
                    }
                    Unit::Usd => match priced {
                        Some((o, usd)) if o == output => usd,
                        _ => {
                            // No price: the model is free to the rules (the
                            // ledger says null); a price too large to count
                            // is over every limit.
                            let usd = (estimate.price)(input(), output)
                                .map_or(0, |u| scaled(u).unwrap_or(MAX_AMOUNT));
                            priced = Some((output, usd));
                            usd
                        }
                    },
                }
                .min(MAX_AMOUNT);
                takes.push(Take {
                    limit: first + i,
                    key: "",
                    frame: l.span.frame(now),
                    amount,
                    ceiling: l.limit,
                    enforce: rule.action != Action::Observe,
                });
            }
            keys.extend(std::iter::repeat_n(key, rule.limits.len()));
        }
        if takes.is_empty() {
            return Admission::Granted(Grant::empty());
        }
        for (t, k) in takes.iter_mut().zip(&keys) {
            t.key = k;
        }
        let keep: Vec<i64> = takes
            .iter()
            .map(|t| self.span_of(t.limit).keep_ms(t.frame.current, now))
            .collect();
        let mut shared_keys = None;
        let mut result = None;
        if let Some(s) = self.shared.as_ref().filter(|s| s.is_up()) {
            let names: Vec<String> = takes
                .iter()
                .map(|t| self.redis_key(t.limit, t.key))
                .collect();
            if let Ok(r) = s.admit(&names, &takes, &keep).await {
                if r.is_ok() {
                    let _ = self.local.take(&takes, true);
                }
                result = Some(r);
                shared_keys = Some(names);
            }
        }
        let result = match result {
            Some(r) => r,
            None => {
                if let Some(s) = &self.shared {
                    s.stats.local_admissions.fetch_add(1, Ordering::Relaxed);
                }
                self.local.take(&takes, false)
            }
        };
        match result {
            Ok(figures) => {
                let headers = self.headroom(&takes, &figures, now);
                let holds = takes
                    .iter()
                    .enumerate()
                    .map(|(i, t)| Hold {
                        limit: t.limit,
                        key: t.key.into(),
                        bucket: t.frame.current,
                        amount: t.amount,
                        shared: shared_keys.as_ref().map(|n| Arc::from(n[i].as_str())),
                        keep_ms: keep[i],
                    })
                    .collect();
                Admission::Granted(Grant {
                    quota: Some(self.clone()),
                    holds,
                    headers,
                })
            }
            Err(over) => self.tripped(&takes, over, now),
        }
    }

    fn span_of(&self, limit: usize) -> Span {
        self.limit(limit).map_or(
            Span::Rolling(crate::config::limits::Window::Minute),
            |(_, l)| l.span,
        )
    }

    fn redis_key(&self, limit: usize, key: &str) -> String {
        let prefix = self.redis_prefixes.get(limit).map_or("", String::as_str);
        let mut out = String::with_capacity(prefix.len() + key.len());
        out.push_str(prefix);
        out.push_str(key);
        out
    }

    fn tripped(&self, takes: &[Take], over: Over, now: DateTime<Utc>) -> Admission {
        let Some(t) = takes.get(over.index) else {
            return Admission::Granted(Grant::empty());
        };
        let Some((rule, l)) = self.limit(t.limit) else {
            return Admission::Granted(Grant::empty());
        };
        let frees = over.frees_at.map(|b| l.span.expiry(b));
        let retry_after = match frees {
            Some(at) => (at - now).to_std().unwrap_or_default(),
            None => (l.span.expiry(t.frame.current) - now)
                .to_std()
                .unwrap_or_default(),
        };
        let mut headers = RateHeaders::default();
        let figure = Headroom {
            limit: l.limit,
            remaining: 0,
            reset: retry_after,
        };
        match l.unit {
            Unit::Tokens => headers.tokens = Some(figure),
            Unit::Requests => headers.requests = Some(figure),
            Unit::Usd => {}
        }
        Admission::Tripped(Trip {
            rule: rule.name.clone(),
            kind: rule.kind,
            limit_key: format!("{}:{}", rule.name, t.key),
            action: rule.action.clone(),
            retry_after: retry_after.max(Duration::from_secs(1)),
            never: t.amount > t.ceiling,
            needed: t.amount,
            limit: t.ceiling,
            unit: l.unit,
            window: l.span.name(),
            headers,
        })
    }

    /// The tightest token and request figures among granted takes.
    fn headroom(&self, takes: &[Take], figures: &[Figures], now: DateTime<Utc>) -> RateHeaders {
        let mut out = RateHeaders::default();
        for (t, f) in takes.iter().zip(figures) {
            let Some((_, l)) = self.limit(t.limit) else {
                continue;
            };
            let slot = match l.unit {
                Unit::Tokens => &mut out.tokens,
                Unit::Requests => &mut out.requests,
                Unit::Usd => continue,
            };
            let remaining = (l.limit - f.used).max(0);
            if slot.is_some_and(|s| s.remaining <= remaining) {
                continue;
            }
            let reset = f
                .newest
                .map(|b| (l.span.expiry(b) - now).to_std().unwrap_or_default())
                .unwrap_or_default();
            *slot = Some(Headroom {
                limit: l.limit,
                remaining,
                reset,
            });
        }
        out
    }

    /// Adds spend found in the ledger to each budget's current period (on
    /// start): `spend` gives a budget rule's name, the spend in 10^-10
    /// USD. With Redis, a counter some gateway already keeps is left as it
    /// is, and the shared counters are used only from here on when there
    /// are budgets (the process calls this once, before serving).
    pub async fn seed_budgets(&self, spend: &std::collections::BTreeMap<String, i64>) {
        let now = self.now();
        for (id, &(r, l)) in self.limits.iter().enumerate() {
            let rule = &self.rules[r];
            let Some(&amount) = spend.get(&*rule.name) else {
                continue;
            };
            let lim = &rule.limits[l];
            let frame = lim.span.frame(now);
            self.local.add(id, "*", frame, amount);
            if let Some(s) = &self.shared {
                s.seed(shared::Seed {
                    key: self.redis_key(id, "*"),
                    bucket: frame.current,
                    from: frame.oldest_live,
                    used: amount,
                    keep_ms: lim.span.keep_ms(frame.current, now),
                    until: lim.span.expiry(frame.current),
                });
            }
        }
        if let Some(s) = &self.shared {
            s.seeded();
        }
    }

    fn settle(&self, holds: &mut Vec<Hold>, spent: &Spent) {
        let cost = spent.cost.map_or(0, |u| scaled(u).unwrap_or(MAX_AMOUNT));
        let now = self.now();
        let mut ops = Vec::new();
        for h in holds.drain(..) {
            let Some((rule, l)) = self.limit(h.limit) else {
                continue;
            };
            let actual = match l.unit {
                Unit::Requests => 1,
                Unit::Usd => cost,
                Unit::Tokens => {
                    let n = match rule.count {
                        Count::Total => spent.input.saturating_add(spent.output),
                        Count::Input => spent.input,
                        Count::Output => spent.output,
                    };
                    i64::try_from(n).unwrap_or(MAX_AMOUNT)
                }
            };
            self.local
                .settle(h.limit, &h.key, h.bucket, actual - h.amount, -h.amount);
            if self.shared.is_some() {
                let (key, used, reserved) = match h.shared {
                    Some(key) => (key, actual - h.amount, -h.amount),
                    // Admitted locally while Redis was away: merge the
                    // actual figure.
                    None => (
                        Arc::from(self.redis_key(h.limit, &h.key).as_str()),
                        actual,
                        0,
                    ),
                };
                ops.push(Op {
                    key,
                    bucket: h.bucket,
                    from: l.span.frame(now).oldest_live,
                    used,
                    reserved,
                    keep_ms: h.keep_ms,
                });
            }
        }
        if let Some(s) = &self.shared {
            s.send(ops);
        }
    }
}

impl Grant {
    fn empty() -> Self {
        Self {
            quota: None,
            holds: Vec::new(),
            headers: RateHeaders::default(),
        }
    }

    /// Settles every reservation to what the request used.
    pub fn settle(mut self, spent: &Spent) {
        if let Some(q) = self.quota.take() {
            q.settle(&mut self.holds, spent);
        }
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        if let Some(q) = self.quota.take() {
            q.settle(&mut self.holds, &Spent::default());
        }
    }
}

/// Tests drive the engine directly: config in, admissions out.
#[cfg(test)]
pub(crate) mod tests;
