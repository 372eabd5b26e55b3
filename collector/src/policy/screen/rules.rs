//! The `[[guard]]` rules, compiled once: detectors, a keyword automaton
//! (Aho-Corasick, ASCII case ignored, leftmost-longest) and a `RegexSet`
//! that says which deny patterns can match before any is run for its
//! positions.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use regex::{Regex, RegexSet, RegexSetBuilder};

use crate::config::guard::{GuardAction, GuardConfig, MAX_REGEX_SIZE};
use crate::observe::metrics::{GuardMatch, GuardRule};
use crate::observe::names::Name;
use crate::policy::screen::detect::{self, Detector};
use crate::policy::screen::moderation::Moderation;
use crate::proxy::auth::Caller;
use crate::upstream::Upstream;

/// What a deny-list match is masked with.
pub const DENIED_MASK: &str = "[DENIED]";

/// Which way a text travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Input,
    Output,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Input => "input",
            Direction::Output => "output",
        }
    }
}

/// One compiled rule.
pub struct Rule {
    pub name: Name,
    pub action: GuardAction,
    input: bool,
    output: bool,
    detect: Vec<Detector>,
    keywords: Option<AhoCorasick>,
    patterns: Option<(RegexSet, Vec<Regex>)>,
    models: Vec<glob::Pattern>,
    consumers: Vec<glob::Pattern>,
    teams: Vec<glob::Pattern>,
    pub moderation: Option<Moderation>,
    /// Characters of streamed output held back.
    pub holdback_chars: usize,
}

/// One match: where (byte range), and what stands in for it when masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hit {
    pub at: Range<usize>,
    pub mask: &'static str,
    /// The detector's name, `keyword` or `regex`: logged, never the text.
    pub what: &'static str,
}

/// The rules and their counters.
pub struct Screen {
    rules: Vec<Arc<Rule>>,
    pub counters: Counters,
}

/// A rule could not be built from its (validated) config.
#[derive(Debug, thiserror::Error)]
#[error("guard rule {rule}: {message}")]
pub struct ScreenError {
    pub rule: String,
    pub message: String,
}

impl Screen {
    /// The rules of `configs`; moderation upstreams are looked up in
    /// `upstreams` (validation already checked they exist).
    pub fn new(
        configs: &[GuardConfig],
        upstreams: &HashMap<String, Arc<Upstream>>,
        matches: Family<GuardMatch, Counter>,
        moderation_failures: Family<GuardRule, Counter>,
    ) -> Result<Self, ScreenError> {
        let mut rules = Vec::with_capacity(configs.len());
        for c in configs {
            let fail = |message: String| ScreenError {
                rule: c.name.clone(),
                message,
            };
            let keywords = if c.keywords.is_empty() {
                None
            } else {
                let built = AhoCorasick::builder()
                    .ascii_case_insensitive(true)
                    .match_kind(MatchKind::LeftmostLongest)
                    .build(&c.keywords)
                    .map_err(|e| fail(e.to_string()))?;
                Some(built)
            };
            let patterns = if c.patterns.is_empty() {
                None
            } else {
                let set = RegexSetBuilder::new(&c.patterns)
                    .size_limit(MAX_REGEX_SIZE)
                    .build()
                    .map_err(|e| fail(e.to_string()))?;
                let each = (c.patterns.iter())
                    .map(|p| Regex::new(p).map_err(|e| fail(e.to_string())))
                    .collect::<Result<Vec<_>, _>>()?;
                Some((set, each))
            };
            let moderation = match &c.moderation {
                None => None,
                Some(m) => {
                    let Some(upstream) = upstreams.get(&m.upstream) else {
                        return Err(fail(format!("no upstream {:?}", m.upstream)));
                    };
                    Some(Moderation::new(upstream.clone(), m))
                }
            };
            rules.push(Arc::new(Rule {
                name: Name::from(c.name.as_str()),
                action: c.action,
                input: c.input,
                output: c.output,
                detect: c.detect.clone(),
                keywords,
                patterns,
                models: c.models.clone(),
                consumers: c.consumers.clone(),
                teams: c.teams.clone(),
                moderation,
                holdback_chars: c.holdback_chars,
            }));
        }
        Ok(Self {
            rules,
            counters: Counters {
                matches,
                moderation_failures,
            },
        })
    }

    /// The input and output rules for a request for `model` from
    /// `caller`; both empty (and nothing allocated) without rules.
    pub fn rules_for(&self, model: &str, caller: &Caller<'_>) -> Applying {
        if self.rules.is_empty() {
            return Applying::default();
        }
        let (consumer, team) = (&caller.consumer.name, caller.consumer.team.as_deref());
        Applying {
            input: self.applying(Direction::Input, model, consumer, team),
            output: self.applying(Direction::Output, model, consumer, team),
        }
    }

    /// The rules that apply to a request for `model` from `consumer` (of
    /// `team`) in `direction`, in file order.
    pub fn applying(
        &self,
        direction: Direction,
        model: &str,
        consumer: &str,
        team: Option<&str>,
    ) -> Vec<Arc<Rule>> {
        self.rules
            .iter()
            .filter(|r| r.applies(direction, model, consumer, team))
            .cloned()
            .collect()
    }
}

/// The rules that apply to one request, each way.
#[derive(Default)]
pub struct Applying {
    pub input: Vec<Arc<Rule>>,
    pub output: Vec<Arc<Rule>>,
}

/// The guard's counters: `tollgate_guard_matches_total` and
/// `tollgate_guard_moderation_failures_total`.
#[derive(Clone)]
pub struct Counters {
    matches: Family<GuardMatch, Counter>,
    moderation_failures: Family<GuardRule, Counter>,
}

impl Counters {
    /// Counts a rule's match (and what was done about it).
    pub fn matched(&self, rule: &Rule, direction: Direction, action: GuardAction) {
        self.matches
            .get_or_create(&GuardMatch {
                rule: rule.name.clone(),
                direction: direction.as_str(),
                action: action.as_str(),
            })
            .inc();
    }

    /// Counts a moderation call that timed out or failed.
    pub fn moderation_failed(&self, rule: &Rule) {
        self.moderation_failures
            .get_or_create(&GuardRule {
                rule: rule.name.clone(),
            })
            .inc();
    }
}

impl Rule {
    fn applies(
        &self,
        direction: Direction,
        model: &str,
        consumer: &str,
        team: Option<&str>,
    ) -> bool {
        let way = match direction {
            Direction::Input => self.input,
            Direction::Output => self.output,
        };
        let any = |globs: &[glob::Pattern], v: Option<&str>| {
            globs.is_empty() || v.is_some_and(|v| globs.iter().any(|g| g.matches(v)))
        };
        way && any(&self.models, Some(model))
            && any(&self.consumers, Some(consumer))
            && any(&self.teams, team)
    }

    /// Whether the rule looks at the text itself (not only moderation).
    pub fn scans(&self) -> bool {
        !self.detect.is_empty() || self.keywords.is_some() || self.patterns.is_some()
    }

    /// Every match in `text`, by start.
    pub fn find(&self, text: &str) -> Vec<Hit> {
        let mut hits: Vec<Hit> = Vec::new();
        if !self.detect.is_empty() {
            hits.extend(detect::find(text, &self.detect).into_iter().map(|f| Hit {
                at: f.at,
                mask: f.detector.mask(),
                what: f.detector.name(),
            }));
        }
        if let Some(ac) = &self.keywords {
            hits.extend(ac.find_iter(text).map(|m| Hit {
                at: m.range(),
                mask: DENIED_MASK,
                what: "keyword",
            }));
        }
        if let Some((set, each)) = &self.patterns {
            for i in set.matches(text).iter() {
                hits.extend(
                    each[i]
                        .find_iter(text)
                        .filter(|m| !m.is_empty())
                        .map(|m| Hit {
                            at: m.range(),
                            mask: DENIED_MASK,
                            what: "regex",
                        }),
                );
            }
        }
        hits.sort_by_key(|h| (h.at.start, h.at.end));
        hits
    }
}

/// `text` with `hits` (sorted by start) replaced by their masks;
/// overlapping hits are masked as one span, named by the first.
pub fn mask(text: &str, hits: &[Hit]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for h in hits {
        if h.at.start < at {
            at = at.max(h.at.end);
            continue;
        }
        out.push_str(&text[at..h.at.start]);
        out.push_str(h.mask);
        at = h.at.end;
    }
    out.push_str(&text[at..]);
    out
}
