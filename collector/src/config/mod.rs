//! The gateway's sections of the config file, each with its raw shape (as
//! written, `deny_unknown_fields`, so a typo is an error), its typed shape
//! and its validation: [`gateway`] (`[gateway]`: listener, limits, the
//! ledger's identity and prices), the upstreams (`[upstreams.<name>]`,
//! validated beside the transports in `crate::upstream::config`),
//! [`routes`] (`[[routes]]`, which name upstreams, with their [`cache`]
//! settings beside `[cache]`) and [`consumers`]
//! (`[[consumers]]`), then [`telemetry`] (`[telemetry]`: Prometheus and
//! OpenTelemetry), [`limits`] (`[redis]`, `[[rate_limits]]`,
//! `[[budgets]]`) and [`guard`] (`[[guard]]`, the content rules). They are
//! validated in that order.
//!
//! The binary's loader reads the file, interpolates `${ENV}` and hands
//! these sections over as [`Sections`]; every refusal is a
//! [`tollgate_schemas::config::Invalid`] naming the key path and, where the
//! file says it, the line.

pub mod cache;
pub mod consumers;
pub mod gateway;
pub mod guard;
pub mod limits;
pub mod routes;
pub mod telemetry;

use std::collections::BTreeMap;

use serde::Deserialize;
use tollgate_schemas::config::Invalid;
use toml::Spanned;

pub use crate::upstream::config::{
    OpenAiUpstreamConfig, RawUpstream, UpstreamConfig, UpstreamKind,
};
pub use cache::{CacheMode, CacheScope, CacheSettings, RawCacheSettings, RouteCache};
pub use consumers::{ConsumerConfig, RawConsumer};
pub use gateway::{ClientIp, GatewayConfig, RawGateway};
pub use guard::{GuardAction, GuardConfig, RawGuard};
pub use limits::{BudgetConfig, LimitsConfig, RateLimitConfig, RawBudget, RawRateLimit, RawRedis};
pub use routes::{DEFAULT_FALLBACK_ON, FallbackTrigger, RawRoute, RouteConfig, TargetConfig};
pub use telemetry::{OtlpProtocol, RawTelemetry, TelemetryConfig};
pub use tollgate_schemas::config::Secret;

/// The gateway's sections, validated.
#[derive(Debug, Clone)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    pub routes: Vec<RouteConfig>,
    pub consumers: Vec<ConsumerConfig>,
    pub telemetry: TelemetryConfig,
    pub limits: LimitsConfig,
    pub guards: Vec<GuardConfig>,
    pub cache: CacheSettings,
}

/// The gateway's sections as the file wrote them. Spans are byte offsets
/// into the file they came from.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Sections {
    #[serde(default)]
    pub gateway: RawGateway,
    #[serde(default)]
    pub upstreams: BTreeMap<String, Spanned<RawUpstream>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    #[serde(default)]
    pub consumers: Vec<Spanned<RawConsumer>>,
    #[serde(default)]
    pub telemetry: RawTelemetry,
    pub redis: Option<RawRedis>,
    #[serde(default)]
    pub rate_limits: Vec<Spanned<RawRateLimit>>,
    #[serde(default)]
    pub budgets: Vec<Spanned<RawBudget>>,
    #[serde(default)]
    pub guard: Vec<Spanned<RawGuard>>,
    #[serde(default)]
    pub cache: RawCacheSettings,
}

/// A TOML text holding only the gateway's sections could not be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

impl Config {
    /// Validates the sections: the `[gateway]` table, then upstreams, then
    /// the routes over them, then consumers.
    pub fn from_sections(s: Sections) -> Result<Self, Invalid> {
        let gateway = gateway::validate(s.gateway)?;
        let upstreams = crate::upstream::config::validate(s.upstreams)?;
        let routes = routes::validate(&s.routes, &upstreams)?;
        let consumers = consumers::validate(&s.consumers)?;
        let telemetry = telemetry::validate(s.telemetry)?;
        let limits = limits::validate(s.redis, &s.rate_limits, &s.budgets)?;
        limits::check_references(&limits, &routes, &consumers)?;
        let guards = guard::validate(&s.guard, &upstreams)?;
        guard::check_references(&guards, &routes, &consumers)?;
        let cache = cache::validate_settings(s.cache)?;
        for (path, model) in limits.fallback_models() {
            let routed = routes.iter().any(|r| {
                r.model == model || glob::Pattern::new(&r.model).is_ok_and(|g| g.matches(model))
            });
            if !routed {
                return Err(Invalid::key(
                    path,
                    format!("{model:?} has no route to serve it"),
                ));
            }
        }
        Ok(Self {
            gateway,
            upstreams,
            routes,
            consumers,
            telemetry,
            limits,
            guards,
            cache,
        })
    }

    /// A TOML text with only the gateway's sections, as given (no `${ENV}`):
    /// for tests and tools that build a gateway in process. Errors carry
    /// the line.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let sections: Sections = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        Self::from_sections(sections).map_err(|e| ConfigError(e.located(text)))
    }
}
