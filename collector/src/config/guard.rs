//! `[[guard]]`: content rules on what goes to a model (`input`) and what
//! comes back (`output`): PII and secret detectors, deny lists (keywords
//! and regular expressions), an optional moderation upstream, and what to
//! do on a match (`block`, `mask`, `log`), for the models, consumers and
//! teams the rule names (globs; all when omitted).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use tollgate_schemas::config::Invalid;
use toml::Spanned;

use super::UpstreamConfig;
use crate::policy::screen::detect::Detector;

/// Longest regular expression source accepted, bytes, and the compiled
/// size the `regex` crate may use for one rule's patterns.
pub const MAX_PATTERN_BYTES: usize = 1024;
pub const MAX_REGEX_SIZE: usize = 1 << 20;

/// Characters of streamed output held back by default: longer than any
/// detector's typical match (a PEM header, a 19-digit card with spaces).
pub const DEFAULT_HOLDBACK_CHARS: usize = 128;
/// Most characters a rule may hold back.
pub const MAX_HOLDBACK_CHARS: usize = 16 * 1024;

#[derive(Debug, Clone)]
pub struct GuardConfig {
    /// Shown in the client's error, the event's `limit_key` and metrics.
    pub name: String,
    pub input: bool,
    pub output: bool,
    pub detect: Vec<Detector>,
    /// `keyword:` entries, matched ignoring ASCII case.
    pub keywords: Vec<String>,
    /// `regex:` entries (the `regex` crate's syntax).
    pub patterns: Vec<String>,
    pub action: GuardAction,
    pub models: Vec<glob::Pattern>,
    pub consumers: Vec<glob::Pattern>,
    pub teams: Vec<glob::Pattern>,
    pub moderation: Option<ModerationConfig>,
    /// Streamed output: characters held back so that a match split across
    /// chunks is caught before any of it reaches the client.
    pub holdback_chars: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardDirection {
    Input,
    Output,
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardAction {
    /// Input: 400 `content_blocked`; output: the answer is replaced by the
    /// error, a stream ends with it.
    Block,
    /// Matches are replaced by `[EMAIL]`, `[PHONE]`, ... (`[DENIED]` for
    /// deny-list entries) before the text goes on. A moderation flag
    /// cannot be masked, and blocks.
    Mask,
    /// Counted and logged (the rule and detector, never the text).
    Log,
}

impl GuardAction {
    pub fn as_str(self) -> &'static str {
        match self {
            GuardAction::Block => "block",
            GuardAction::Mask => "mask",
            GuardAction::Log => "log",
        }
    }
}

/// An OpenAI-compatible `/v1/moderations` upstream asked about the text.
#[derive(Debug, Clone)]
pub struct ModerationConfig {
    pub upstream: String,
    pub model: Option<String>,
    pub timeout: Duration,
    /// On a timeout or an error: `true` lets the text through (and counts
    /// it), `false` blocks it.
    pub fail_open: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
enum FailMode {
    Open,
    Closed,
}

/// One `[[guard]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGuard {
    name: String,
    direction: Option<GuardDirection>,
    #[serde(default)]
    detect: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
    action: Option<GuardAction>,
    #[serde(default)]
    models: Vec<String>,
    #[serde(default)]
    consumers: Vec<String>,
    #[serde(default)]
    teams: Vec<String>,
    moderation: Option<RawModeration>,
    holdback_chars: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModeration {
    upstream: String,
    model: Option<String>,
    timeout_ms: Option<u64>,
    fail: Option<FailMode>,
}

/// Each rule's filters must match something configured: a typo would
/// otherwise turn a rule off without a word.
pub fn check_references(
    guards: &[GuardConfig],
    routes: &[crate::config::RouteConfig],
    consumers: &[crate::config::ConsumerConfig],
) -> Result<(), Invalid> {
    for (i, g) in guards.iter().enumerate() {
        let none = |field: &str, j: usize, what: String| {
            Err(Invalid::key(format!("guard[{i}].{field}[{j}]"), what))
        };
        for (j, p) in g.models.iter().enumerate() {
            let routed = routes.iter().any(|r| {
                p.matches(&r.model)
                    || r.model == p.as_str()
                    || glob::Pattern::new(&r.model).is_ok_and(|rp| rp.matches(p.as_str()))
            });
            if !routed {
                return none("models", j, format!("{:?} matches no route", p.as_str()));
            }
        }
        for (j, p) in g.consumers.iter().enumerate() {
            if !consumers.iter().any(|c| p.matches(&c.name)) {
                return none(
                    "consumers",
                    j,
                    format!("{:?} matches no configured consumer", p.as_str()),
                );
            }
        }
        for (j, p) in g.teams.iter().enumerate() {
            let any = consumers
                .iter()
                .any(|c| c.team.as_deref().is_some_and(|t| p.matches(t)));
            if !any {
                return none(
                    "teams",
                    j,
                    format!("{:?} matches no configured consumer's team", p.as_str()),
                );
            }
        }
    }
    Ok(())
}

/// The rules, in file order; moderation upstreams must exist.
pub fn validate(
    raw: &[Spanned<RawGuard>],
    upstreams: &BTreeMap<String, UpstreamConfig>,
) -> Result<Vec<GuardConfig>, Invalid> {
    let mut out: Vec<GuardConfig> = Vec::new();
    for (i, spanned) in raw.iter().enumerate() {
        let span = spanned.span();
        let g = spanned.get_ref();
        let err =
            |field: &str, m: String| Invalid::at(span.clone(), format!("guard[{i}]{field}"), m);
        let name_ok = !g.name.is_empty()
            && g.name.len() <= 64
            && g.name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !name_ok {
            return Err(err(
                ".name",
                "1 to 64 of A-Z, a-z, 0-9, '-', '_', '.'".into(),
            ));
        }
        if out.iter().any(|o| o.name == g.name) {
            return Err(err(".name", format!("{:?} is used twice", g.name)));
        }
        let mut detect = Vec::new();
        for (j, d) in g.detect.iter().enumerate() {
            let Some(found) = Detector::from_name(d) else {
                let known: Vec<_> = Detector::ALL.iter().map(|d| d.name()).collect();
                return Err(err(
                    &format!(".detect[{j}]"),
                    format!("unknown detector {d:?} (known: {})", known.join(", ")),
                ));
            };
            if !detect.contains(&found) {
                detect.push(found);
            }
        }
        let (mut keywords, mut patterns) = (Vec::new(), Vec::new());
        for (j, entry) in g.deny.iter().enumerate() {
            let field = format!(".deny[{j}]");
            if let Some(k) = entry.strip_prefix("keyword:") {
                if k.trim().is_empty() || k.chars().count() > MAX_PATTERN_BYTES {
                    return Err(err(&field, "a keyword of 1 to 1024 characters".into()));
                }
                keywords.push(k.to_string());
            } else if let Some(p) = entry.strip_prefix("regex:") {
                if p.len() > MAX_PATTERN_BYTES {
                    return Err(err(&field, "a regex of at most 1024 bytes".into()));
                }
                let built = regex::RegexBuilder::new(p)
                    .size_limit(MAX_REGEX_SIZE)
                    .build();
                match built {
                    Err(e) => return Err(err(&field, format!("bad regex: {e}"))),
                    Ok(r) if r.is_match("") => {
                        return Err(err(&field, "the regex matches empty text".into()));
                    }
                    Ok(_) => patterns.push(p.to_string()),
                }
            } else {
                return Err(err(
                    &field,
                    "must start with \"keyword:\" or \"regex:\"".into(),
                ));
            }
        }
        let moderation = match &g.moderation {
            None => None,
            Some(m) => {
                if !upstreams.contains_key(&m.upstream) {
                    let known: Vec<_> = upstreams.keys().cloned().collect();
                    return Err(err(
                        ".moderation.upstream",
                        format!(
                            "unknown upstream {:?} (known: {})",
                            m.upstream,
                            known.join(", ")
                        ),
                    ));
                }
                let ms = m.timeout_ms.unwrap_or(1000);
                if !(1..=60_000).contains(&ms) {
                    return Err(err(".moderation.timeout_ms", "1 to 60000".into()));
                }
                Some(ModerationConfig {
                    upstream: m.upstream.clone(),
                    model: m.model.clone(),
                    timeout: Duration::from_millis(ms),
                    fail_open: m.fail.unwrap_or(FailMode::Open) == FailMode::Open,
                })
            }
        };
        if detect.is_empty() && keywords.is_empty() && patterns.is_empty() && moderation.is_none() {
            return Err(err(
                "",
                "says nothing to look for: give detect, deny or moderation".into(),
            ));
        }
        let holdback_chars = g.holdback_chars.unwrap_or(DEFAULT_HOLDBACK_CHARS);
        if !(1..=MAX_HOLDBACK_CHARS).contains(&holdback_chars) {
            return Err(err(".holdback_chars", format!("1 to {MAX_HOLDBACK_CHARS}")));
        }
        if let Some(k) = keywords.iter().find(|k| k.chars().count() > holdback_chars) {
            return Err(err(
                ".holdback_chars",
                format!(
                    "must be at least the longest keyword ({} characters)",
                    k.chars().count()
                ),
            ));
        }
        let globs = |field: &str, list: &[String]| -> Result<Vec<glob::Pattern>, Invalid> {
            list.iter()
                .enumerate()
                .map(|(j, p)| {
                    glob::Pattern::new(p)
                        .map_err(|e| err(&format!(".{field}[{j}]"), format!("bad glob {p:?}: {e}")))
                })
                .collect()
        };
        let direction = g.direction.unwrap_or(GuardDirection::Both);
        out.push(GuardConfig {
            name: g.name.clone(),
            input: direction != GuardDirection::Output,
            output: direction != GuardDirection::Input,
            detect,
            keywords,
            patterns,
            action: g.action.unwrap_or(GuardAction::Block),
            models: globs("models", &g.models)?,
            consumers: globs("consumers", &g.consumers)?,
            teams: globs("teams", &g.teams)?,
            moderation,
            holdback_chars,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use crate::config::Config;

    const BASE: &str = r#"
[upstreams.sim]
kind = "simulated"
[upstreams.mod]
kind = "simulated"
[[routes]]
model = "m"
targets = [{ upstream = "sim" }]
[[consumers]]
name = "app"
team = "search"
api_keys = ["sha256:0000000000000000000000000000000000000000000000000000000000000000"]
"#;

    fn load(guard: &str) -> Result<Config, String> {
        Config::from_toml(&format!("{BASE}\n{guard}")).map_err(|e| e.0)
    }

    #[test]
    fn a_full_rule_is_read_with_its_defaults() {
        let c = load(
            r#"
[[guard]]
name = "no-pii-out"
direction = "input"
detect = ["email", "phone", "bank_card", "cn_resident_id", "secret"]
deny = ["keyword:internal-only", "regex:(?i)project\\s+falcon"]
action = "mask"
models = ["*"]
moderation = { upstream = "mod", timeout_ms = 200, fail = "closed" }
"#,
        )
        .unwrap();
        let g = &c.guards[0];
        assert!(g.input && !g.output);
        assert_eq!(g.detect.len(), 5);
        assert_eq!(g.keywords, ["internal-only"]);
        assert_eq!(g.patterns, ["(?i)project\\s+falcon"]);
        let m = g.moderation.as_ref().unwrap();
        assert!(!m.fail_open);
        assert_eq!(m.timeout.as_millis(), 200);
        let d = load("[[guard]]\nname = \"d\"\ndetect = [\"email\"]\n").unwrap();
        let d = &d.guards[0];
        assert!(d.input && d.output, "both directions by default");
        assert_eq!(d.action, super::GuardAction::Block);
    }

    #[test]
    fn bad_rules_are_refused_with_their_key() {
        let cases = [
            ("name = \"a b\"\ndetect = [\"email\"]", "guard[0].name"),
            (
                "name = \"a\"\ndetect = [\"ssn\"]",
                "unknown detector \"ssn\"",
            ),
            ("name = \"a\"\ndeny = [\"falcon\"]", "must start with"),
            ("name = \"a\"\ndeny = [\"regex:(\"]", "bad regex"),
            ("name = \"a\"\ndeny = [\"regex:x*\"]", "matches empty text"),
            ("name = \"a\"", "says nothing to look for"),
            (
                "name = \"a\"\ndetect = [\"email\"]\naction = \"drop\"",
                "action",
            ),
            (
                "name = \"a\"\ndetect = [\"email\"]\nholdback_chars = 0",
                "holdback_chars",
            ),
            (
                "name = \"a\"\ndeny = [\"keyword:abcdef\"]\nholdback_chars = 3",
                "longest keyword",
            ),
            (
                "name = \"a\"\nmoderation = { upstream = \"nope\" }",
                "unknown upstream \"nope\"",
            ),
            (
                "name = \"a\"\ndetect = [\"email\"]\nmodels = [\"[\"]",
                "bad glob",
            ),
        ];
        for (rule, needle) in cases {
            let e = load(&format!("[[guard]]\n{rule}\n")).unwrap_err();
            assert!(e.contains(needle), "{rule}: {e}");
        }
        let twice = "[[guard]]\nname = \"a\"\ndetect = [\"email\"]\n";
        let e = load(&format!("{twice}{twice}")).unwrap_err();
        assert!(e.contains("used twice"), "{e}");
    }
}
