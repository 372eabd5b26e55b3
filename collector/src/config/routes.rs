//! `[[routes]]`: which upstreams serve a model name (a glob), with weights,
//! and which exact-name routes to fall back to on which failures.

use std::collections::BTreeMap;

use serde::Deserialize;
use tollgate_schemas::config::Invalid;
use toml::Spanned;

use super::UpstreamConfig;
use super::cache::{self, RawRouteCache, RouteCache};

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// A model name or glob (`qwq-*`).
    pub model: String,
    pub targets: Vec<TargetConfig>,
    /// Exact-name routes tried in order when every target failed.
    pub fallback: Vec<String>,
    pub fallback_on: Vec<FallbackTrigger>,
    /// The response cache; `None` when off.
    pub cache: Option<RouteCache>,
}

#[derive(Debug, Clone)]
pub struct TargetConfig {
    pub upstream: String,
    /// Model name sent upstream; `None` = the name the client asked for.
    pub model: Option<String>,
    pub weight: u32,
}

/// A failure that moves a request to the next target or fallback route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum FallbackTrigger {
    #[serde(rename = "connect")]
    Connect,
    #[serde(rename = "timeout")]
    Timeout,
    #[serde(rename = "5xx")]
    ServerError,
    #[serde(rename = "429")]
    RateLimited,
    #[serde(rename = "4xx")]
    ClientError,
}

pub const DEFAULT_FALLBACK_ON: [FallbackTrigger; 4] = [
    FallbackTrigger::Connect,
    FallbackTrigger::Timeout,
    FallbackTrigger::ServerError,
    FallbackTrigger::RateLimited,
];

/// One `[[routes]]` entry as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    model: String,
    targets: Vec<RawTarget>,
    #[serde(default)]
    fallback: Vec<Spanned<String>>,
    fallback_on: Option<Vec<FallbackTrigger>>,
    cache: Option<RawRouteCache>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTarget {
    upstream: Spanned<String>,
    model: Option<String>,
    weight: Option<u32>,
}

/// Routes over `upstreams`; fallbacks are checked once every route is known.
pub fn validate(
    raw: &[Spanned<RawRoute>],
    upstreams: &BTreeMap<String, UpstreamConfig>,
) -> Result<Vec<RouteConfig>, Invalid> {
    let mut routes: Vec<RouteConfig> = Vec::new();
    for (i, spanned) in raw.iter().enumerate() {
        let span = spanned.span();
        let r = spanned.get_ref();
        let err =
            |field: &str, m: String| Invalid::at(span.clone(), format!("routes[{i}]{field}"), m);
        if r.model.is_empty() {
            return Err(err(".model", "must not be empty".into()));
        }
        glob::Pattern::new(&r.model)
            .map_err(|e| err(".model", format!("bad glob {:?}: {e}", r.model)))?;
        if routes.iter().any(|o| o.model == r.model) {
            return Err(err(".model", format!("{:?} is routed twice", r.model)));
        }
        if r.targets.is_empty() {
            return Err(err(".targets", "at least one target is required".into()));
        }
        let mut targets = Vec::new();
        for (j, t) in r.targets.iter().enumerate() {
            if !upstreams.contains_key(t.upstream.get_ref()) {
                let known: Vec<_> = upstreams.keys().cloned().collect();
                return Err(Invalid::at(
                    t.upstream.span(),
                    format!("routes[{i}].targets[{j}].upstream"),
                    format!(
                        "unknown upstream {:?} (known: {})",
                        t.upstream.get_ref(),
                        known.join(", ")
                    ),
                ));
            }
            let weight = t.weight.unwrap_or(1);
            if weight == 0 {
                return Err(err(
                    &format!(".targets[{j}].weight"),
                    "must be at least 1".into(),
                ));
            }
            targets.push(TargetConfig {
                upstream: t.upstream.get_ref().clone(),
                model: t.model.clone(),
                weight,
            });
        }
        let cache = match &r.cache {
            None => None,
            Some(c) => cache::validate_route(c, &format!("routes[{i}]"), upstreams)?,
        };
        routes.push(RouteConfig {
            cache,
            model: r.model.clone(),
            targets,
            fallback: r.fallback.iter().map(|f| f.get_ref().clone()).collect(),
            fallback_on: r
                .fallback_on
                .clone()
                .unwrap_or_else(|| DEFAULT_FALLBACK_ON.to_vec()),
        });
    }
    for (i, spanned) in raw.iter().enumerate() {
        for (j, f) in spanned.get_ref().fallback.iter().enumerate() {
            let (span, f) = (f.span(), f.get_ref());
            let path = format!("routes[{i}].fallback[{j}]");
            let exists = routes
                .iter()
                .any(|r| &r.model == f && !r.model.contains(['*', '?', '[']));
            if !exists {
                return Err(Invalid::at(
                    span,
                    path,
                    format!("{f:?} is not the model of an exact-name route"),
                ));
            }
            if f == &routes[i].model {
                return Err(Invalid::at(
                    span,
                    path,
                    "a route cannot fall back to itself",
                ));
            }
        }
    }
    Ok(routes)
}
