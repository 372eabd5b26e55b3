//! The configured rate limits and budgets as one list of rules: which
//! requests each applies to, which counter a request lands in (the key
//! value), and what each of its limits counts.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::http::HeaderMap;
use sha2::{Digest, Sha256};

use super::span::Span;
use crate::config::limits::{
    Count, KeySource, LimitsConfig, OnExhausted, OnLimit, Scope, Unit, ValueMatch, scaled,
};

/// Longest key value kept as written; longer ones are counted under a
/// digest so that a client cannot grow keys (or `limit_key`) without bound.
const MAX_KEY_CHARS: usize = 96;

/// What a request looks like to the rules.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The model the rules see: the one asked for, or the fallback's.
    pub model: &'a str,
    pub consumer: Option<&'a str>,
    pub team: Option<&'a str>,
    pub tags: &'a BTreeMap<String, String>,
    pub headers: &'a HeaderMap,
    /// The URL's query string, undecoded.
    pub query: Option<&'a str>,
    /// The TCP peer.
    pub peer: Option<IpAddr>,
}

/// Why a rule trips, as the event and the error say it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    RateLimit,
    Budget,
}

/// What a tripped rule does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// 429 (`rate_limit_exceeded` or `budget_exceeded`).
    Reject,
    /// Served by this model instead.
    Fallback(String),
    /// Counted, never refused (a budget's `alert_only`).
    Observe,
}

/// One figure of a rule.
#[derive(Debug, Clone)]
pub struct Limit {
    pub unit: Unit,
    pub span: Span,
    /// In tokens, requests or 10^-10 USD.
    pub limit: i64,
}

#[derive(Debug)]
pub struct Rule {
    pub name: Arc<str>,
    pub kind: Kind,
    scope: Scope,
    key: KeySource,
    matches: Vec<ValueMatch>,
    shared: bool,
    pub count: Count,
    pub default_output_tokens: u64,
    pub action: Action,
    pub limits: Vec<Limit>,
}

/// Every rule, rate limits first, in config order.
pub fn compile(config: &LimitsConfig) -> Vec<Rule> {
    let mut rules = Vec::new();
    for r in &config.rate_limits {
        rules.push(Rule {
            name: r.name.as_str().into(),
            kind: Kind::RateLimit,
            scope: r.scope.clone(),
            key: r.key.clone(),
            matches: r.matches.clone(),
            shared: r.shared,
            count: r.count,
            default_output_tokens: r.default_output_tokens,
            action: match &r.on_limit {
                OnLimit::Reject => Action::Reject,
                OnLimit::Fallback(m) => Action::Fallback(m.clone()),
            },
            limits: r
                .limits
                .iter()
                .map(|l| Limit {
                    unit: l.unit,
                    span: Span::Rolling(l.window),
                    limit: l.limit,
                })
                .collect(),
        });
    }
    for b in &config.budgets {
        rules.push(Rule {
            name: b.name.as_str().into(),
            kind: Kind::Budget,
            scope: b.scope.clone(),
            key: KeySource::Global,
            matches: Vec::new(),
            shared: false,
            count: Count::Total,
            default_output_tokens: b.default_output_tokens,
            action: match &b.on_exhausted {
                OnExhausted::Block => Action::Reject,
                OnExhausted::AlertOnly => Action::Observe,
                OnExhausted::Downgrade(m) => Action::Fallback(m.clone()),
            },
            limits: vec![Limit {
                unit: Unit::Usd,
                span: Span::Calendar(b.period, b.timezone),
                limit: scaled(b.usd).unwrap_or(i64::MAX),
            }],
        });
    }
    rules
}

impl Rule {
    /// Whether the rule's scope takes the request.
    pub fn applies(&self, ask: &Ask) -> bool {
        let s = &self.scope;
        let fits = |p: &Option<glob::Pattern>, v: Option<&str>| {
            p.as_ref().is_none_or(|p| v.is_some_and(|v| p.matches(v)))
        };
        if ask
            .consumer
            .is_some_and(|c| s.exempt.iter().any(|e| e == c))
        {
            return false;
        }
        fits(&s.model, Some(ask.model))
            && fits(&s.consumer, ask.consumer)
            && fits(&s.team, ask.team)
            && s.tag
                .as_ref()
                .is_none_or(|(k, p)| tag(ask, k).is_some_and(|v| p.matches(&v)))
    }

    /// One counter for every request it takes (budgets and `key = "global"`).
    pub fn is_global(&self) -> bool {
        self.key == KeySource::Global
    }

    /// Whether a counter of this rule keyed `key` belongs to the consumer
    /// `name` of `team`: the rule's scope may take its requests, and the
    /// counter is keyed by its name, its team or nothing.
    pub fn owned_by(&self, key: &str, name: &str, team: Option<&str>) -> bool {
        let s = &self.scope;
        if s.exempt.iter().any(|e| e == name)
            || s.consumer.as_ref().is_some_and(|p| !p.matches(name))
            || s.team
                .as_ref()
                .is_some_and(|p| !team.is_some_and(|t| p.matches(t)))
        {
            return false;
        }
        match &self.key {
            KeySource::Global => true,
            KeySource::Consumer => key == name,
            KeySource::Team => Some(key) == team,
            _ => false,
        }
    }

    /// The counter the request lands in; `None`: the request has no value
    /// for the key (or none that matches), so this rule does not count it.
    pub fn key<'a>(&self, ask: &Ask<'a>, ip_header: Option<&str>) -> Option<Cow<'a, str>> {
        let bytes: Cow<'a, [u8]> = match &self.key {
            KeySource::Global => return Some(Cow::Borrowed("*")),
            KeySource::Consumer => Cow::Borrowed(ask.consumer?.as_bytes()),
            KeySource::Team => Cow::Borrowed(ask.team?.as_bytes()),
            KeySource::Tag(k) => tag_bytes(ask, k)?,
            KeySource::Header(h) => Cow::Borrowed(ask.headers.get(h)?.as_bytes().trim_ascii()),
            KeySource::Cookie(name) => Cow::Borrowed(cookie(ask.headers, name)?),
            KeySource::Query(p) => query_param(ask.query?, p)?,
            KeySource::Ip => Cow::Owned(client_ip(ask, ip_header)?.to_string().into_bytes()),
        };
        // Bytes that are not text are counted by their digest (two
        // different values never share a counter) and match no pattern.
        let value: Cow<'a, str> = match bytes {
            Cow::Borrowed(b) => match std::str::from_utf8(b) {
                Ok(s) => Cow::Borrowed(s),
                Err(_) => return self.matches.is_empty().then(|| Cow::Owned(digest(b))),
            },
            Cow::Owned(b) => match String::from_utf8(b) {
                Ok(s) => Cow::Owned(s),
                Err(e) => {
                    return self
                        .matches
                        .is_empty()
                        .then(|| Cow::Owned(digest(e.as_bytes())));
                }
            },
        };
        if value.is_empty() {
            return None;
        }
        if !self.matches.is_empty() {
            let hit = self.matches.iter().find(|m| match m {
                ValueMatch::Glob(g) => g.matches(&value),
                ValueMatch::Regex(r) => r.is_match(&value),
                ValueMatch::Cidr(net) => value.parse::<IpAddr>().is_ok_and(|ip| net.contains(&ip)),
            })?;
            if self.shared {
                return Some(Cow::Owned(match hit {
                    ValueMatch::Glob(g) => g.as_str().to_string(),
                    ValueMatch::Regex(r) => format!("regexp:{}", r.as_str()),
                    ValueMatch::Cidr(n) => n.to_string(),
                }));
            }
        }
        Some(bounded(value))
    }
}

/// A key value as counted: short printable values as they are, anything
/// else (and anything that looks like a digest, so none can be forged) as
/// `sha256:` and 16 hex digits.
fn bounded(v: Cow<'_, str>) -> Cow<'_, str> {
    let plain = v.len() <= MAX_KEY_CHARS
        && !v.starts_with(DIGEST)
        && v.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if plain {
        return v;
    }
    Cow::Owned(digest(v.as_bytes()))
}

const DIGEST: &str = "sha256:";

fn digest(bytes: &[u8]) -> String {
    format!("{DIGEST}{}", hex::encode(&Sha256::digest(bytes)[..8]))
}

/// The client's address: the configured header's (for `x-forwarded-for`
/// the last entry, the one the trusted proxy appended; with or without a
/// port), else the peer's; an IPv4-mapped IPv6 address as the IPv4 one.
pub fn client_ip(ask: &Ask, ip_header: Option<&str>) -> Option<IpAddr> {
    let from_header = ip_header.and_then(|h| {
        let v = ask.headers.get_all(h).iter().next_back()?;
        let v = String::from_utf8_lossy(v.as_bytes());
        let last = v.rsplit(',').next()?.trim();
        last.parse::<IpAddr>()
            .ok()
            .or_else(|| last.parse::<std::net::SocketAddr>().ok().map(|a| a.ip()))
            .or_else(|| {
                last.trim_start_matches('[')
                    .trim_end_matches(']')
                    .parse()
                    .ok()
            })
    });
    from_header.or(ask.peer).map(|ip| ip.to_canonical())
}

/// A tag of the request's `x-tollgate-tags`, read from the header itself
/// (the ledger keeps short tags only, a limit must count long ones too),
/// else from `tags` (an event's, when budgets are rebuilt).
fn tag_bytes<'a>(ask: &Ask<'a>, key: &str) -> Option<Cow<'a, [u8]>> {
    let from_header = ask
        .headers
        .get_all("x-tollgate-tags")
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .find_map(|pair| {
            let at = pair.iter().position(|b| *b == b'=')?;
            let (k, v) = (&pair[..at], &pair[at + 1..]);
            (k.trim_ascii() == key.as_bytes()).then(|| v.trim_ascii())
        });
    match from_header.filter(|v| !v.is_empty()) {
        Some(v) => Some(Cow::Borrowed(v)),
        None => ask.tags.get(key).map(|v| Cow::Borrowed(v.as_bytes())),
    }
}

/// [`tag_bytes`] as text, for matching the rule's tag filter.
fn tag<'a>(ask: &Ask<'a>, key: &str) -> Option<Cow<'a, str>> {
    match tag_bytes(ask, key)? {
        Cow::Borrowed(b) => Some(String::from_utf8_lossy(b)),
        Cow::Owned(b) => Some(Cow::Owned(String::from_utf8_lossy(&b).into_owned())),
    }
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a [u8]> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .find_map(|pair| {
            let at = pair.iter().position(|b| *b == b'=')?;
            let (k, v) = (&pair[..at], pair[at + 1..].trim_ascii());
            let v = v
                .strip_prefix(b"\"")
                .and_then(|v| v.strip_suffix(b"\""))
                .unwrap_or(v);
            (k.trim_ascii() == name.as_bytes()).then_some(v)
        })
}

fn query_param<'a>(query: &'a str, name: &str) -> Option<Cow<'a, [u8]>> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (*decode(k) == *name.as_bytes()).then(|| decode(v))
    })
}

/// A query string part, `+` and percent-escapes decoded, as bytes.
fn decode(s: &str) -> Cow<'_, [u8]> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s.as_bytes());
    }
    let spaced = s.replace('+', " ");
    Cow::Owned(percent_encoding::percent_decode_str(&spaced).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use axum::http::HeaderValue;

    fn rules(extra: &str) -> Vec<Rule> {
        let text = format!(
            "[upstreams.s]\nkind = \"simulated\"\n[[routes]]\nmodel = \"*\"\ntargets = [{{ upstream = \"s\" }}]\n{}{extra}",
            crate::policy::quota::tests::CONSUMERS
        );
        compile(&Config::from_toml(&text).unwrap().limits)
    }

    fn key_of(rule: &Rule, headers: &HeaderMap, query: Option<&str>, peer: &str) -> Option<String> {
        let mut headers = headers.clone();
        headers.insert(
            "x-tollgate-tags",
            HeaderValue::from_static("feature=search"),
        );
        let headers = &headers;
        let tags = BTreeMap::new();
        let ask = Ask {
            model: "m",
            consumer: Some("alice"),
            team: Some("search"),
            tags: &tags,
            headers,
            query,
            peer: peer.parse().ok(),
        };
        rule.key(&ask, None).map(Cow::into_owned)
    }

    #[test]
    fn every_key_source_reads_its_value() {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_static("u-1"));
        h.insert(
            "cookie",
            HeaderValue::from_static("a=1; session=s%20x; b=2"),
        );
        // A value shaped like a digest is itself digested: none is forged.
        h.insert(
            "x-forged",
            HeaderValue::from_static("sha256:fb1552c13c0c3496"),
        );
        let cases = [
            ("consumer", Some("alice")),
            ("team", Some("search")),
            ("global", Some("*")),
            ("ip", Some("10.1.2.3")),
            ("header:X-User", Some("u-1")),
            ("header:x-missing", None),
            ("query:user", Some("q v")),
            ("cookie:session", Some("s%20x")),
            ("header:x-forged", Some("sha256:eb4fcb2bbc545c84")),
            ("tag:feature", Some("search")),
            ("tag:env", None),
        ];
        for (key, want) in cases {
            let r = &rules(&format!(
                "[[rate_limits]]\nname = \"r\"\nkey = \"{key}\"\nrequests_per_minute = 1"
            ))[0];
            let got = key_of(r, &h, Some("x=1&user=q+v"), "10.1.2.3");
            assert_eq!(got.as_deref(), want, "{key}");
        }
    }

    #[test]
    fn matched_values_count_alone_or_shared() {
        let h = HeaderMap::new();
        let per = &rules(
            "[[rate_limits]]\nname = \"r\"\nkey = \"ip\"\nmatch = [\"10.0.0.0/8\"]\nrequests_per_minute = 1",
        )[0];
        assert_eq!(
            key_of(per, &h, None, "10.9.9.9").as_deref(),
            Some("10.9.9.9")
        );
        assert_eq!(
            key_of(per, &h, None, "192.168.1.1"),
            None,
            "outside the range"
        );
        let shared = &rules(
            "[[rate_limits]]\nname = \"r\"\nkey = \"ip\"\nmatch = [\"10.0.0.0/8\"]\nshared = true\nrequests_per_minute = 1",
        )[0];
        assert_eq!(
            key_of(shared, &h, None, "10.9.9.9").as_deref(),
            Some("10.0.0.0/8")
        );
        let re = &rules(
            "[[rate_limits]]\nname = \"r\"\nkey = \"consumer\"\nmatch = \"regexp:^al\"\nrequests_per_minute = 1",
        )[0];
        assert_eq!(key_of(re, &h, None, "").as_deref(), Some("alice"));
        let glob = &rules(
            "[[rate_limits]]\nname = \"r\"\nkey = \"consumer\"\nmatch = \"bob*\"\nrequests_per_minute = 1",
        )[0];
        assert_eq!(key_of(glob, &h, None, ""), None);
    }

    #[test]
    fn values_that_are_not_text_keep_counters_of_their_own() {
        let r = &rules(
            "[[rate_limits]]\nname = \"r\"\nkey = \"header:x-user\"\nrequests_per_minute = 1",
        )[0];
        let mut keys = Vec::new();
        for raw in [&b"caf\xe9"[..], b"caf\xe8"] {
            let mut h = HeaderMap::new();
            h.insert("x-user", HeaderValue::from_bytes(raw).unwrap());
            keys.push(key_of(r, &h, None, "").unwrap());
        }
        assert_ne!(keys[0], keys[1]);
        let q =
            &rules("[[rate_limits]]\nname = \"r\"\nkey = \"query:u\"\nrequests_per_minute = 1")[0];
        let a = key_of(q, &HeaderMap::new(), Some("u=caf%E9"), "");
        let b = key_of(q, &HeaderMap::new(), Some("u=caf%E8"), "");
        assert!(a.is_some() && a != b);
    }

    #[test]
    fn long_or_odd_values_are_counted_under_a_digest() {
        let mut h = HeaderMap::new();
        h.insert("x-user", HeaderValue::from_str(&"v".repeat(500)).unwrap());
        let r = &rules(
            "[[rate_limits]]\nname = \"r\"\nkey = \"header:x-user\"\nrequests_per_minute = 1",
        )[0];
        let k = key_of(r, &h, None, "").unwrap();
        assert!(k.starts_with("sha256:") && k.len() == 23, "{k}");
    }

    #[test]
    fn forwarded_addresses_are_read_only_when_configured() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 2.2.2.2"),
        );
        let tags = BTreeMap::new();
        let ask = Ask {
            model: "m",
            consumer: None,
            team: None,
            tags: &tags,
            headers: &h,
            query: None,
            peer: "127.0.0.1".parse().ok(),
        };
        assert_eq!(client_ip(&ask, None), "127.0.0.1".parse().ok());
        assert_eq!(
            client_ip(&ask, Some("x-forwarded-for")),
            "2.2.2.2".parse().ok()
        );
    }

    #[test]
    fn scope_filters_and_exemptions() {
        let r = &rules(
            "[[rate_limits]]\nname = \"r\"\nmodel = \"deepseek-*\"\ntag = \"feature=sea*\"\nexempt = [\"ops\"]\nrequests_per_minute = 1",
        )[0];
        let mut h = HeaderMap::new();
        h.insert(
            "x-tollgate-tags",
            HeaderValue::from_static("feature=search"),
        );
        let tags = BTreeMap::new();
        let ask = |model, consumer| Ask {
            model,
            consumer: Some(consumer),
            team: None,
            tags: &tags,
            headers: &h,
            query: None,
            peer: None,
        };
        assert!(r.applies(&ask("deepseek-r1", "alice")));
        assert!(!r.applies(&ask("qwq-32b", "alice")));
        assert!(!r.applies(&ask("deepseek-r1", "ops")));
    }
}
