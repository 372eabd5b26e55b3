//! The gateway's shared state: everything a request reads, built once from
//! the config (keys, routes and upstreams, the ledger, limits on sizes).
//! Handlers import the state, never the router.

use std::collections::HashMap;
use std::sync::Arc;

use tollgate_schemas::PriceCatalog;
use tollgate_schemas::metrics::Collector;

use crate::CollectorError;
use crate::config::Config;
use crate::ledger::tap::Tap;
use crate::ledger::{Ledger, Pricing};
use crate::observe::metrics::Names;
use crate::observe::{Estimates, GatewayMetrics, Observe, Telemetry};
use crate::policy::cache::Cache;
use crate::policy::quota::Quota;
use crate::policy::screen::Screen;
use crate::proxy::auth::Keyring;
use crate::proxy::routing::Routes;
use crate::upstream::Upstream;

pub struct Gateway {
    pub keyring: Keyring,
    pub routes: Routes,
    pub ledger: Arc<Ledger>,
    pub max_body_bytes: usize,
    pub max_response_bytes: usize,
    /// `/metrics` and OpenTelemetry, shared with the ledger.
    pub observe: Arc<Observe>,
    /// Rate limits and budgets.
    pub quota: Arc<Quota>,
    /// The content guard's rules.
    pub screen: Screen,
    /// The response cache's store.
    pub cache: Arc<Cache>,
    /// Reads every rule's state on `GET /v1/limits`.
    pub admin_token: Option<tollgate_schemas::config::Secret>,
}

impl Gateway {
    /// The gateway `config` describes, its events going to `tap`; `others`
    /// are the rest of the process's counters, shown on its `/metrics`.
    /// Starts OpenTelemetry export when `[telemetry]` or the
    /// `OTEL_EXPORTER_OTLP_*` environment names an endpoint.
    pub fn new(
        config: &Config,
        tap: Arc<Tap>,
        mut others: Vec<Box<dyn Collector>>,
    ) -> Result<Self, CollectorError> {
        let catalog = match &config.gateway.prices {
            Some(path) => PriceCatalog::load(path)?,
            None => PriceCatalog::shipped()?,
        };
        warn_unpriced(config, &catalog);
        let mut upstreams = HashMap::new();
        for (name, u) in &config.upstreams {
            let up = Upstream::new(u).map_err(|e| CollectorError::Upstream {
                name: name.clone(),
                message: e.to_string(),
            })?;
            upstreams.insert(name.clone(), Arc::new(up));
        }
        let mut listed: Vec<Arc<Upstream>> = upstreams.values().cloned().collect();
        listed.sort_by(|a, b| a.name().cmp(b.name()));
        let names = Arc::new(Names::new(config));
        let telemetry =
            Telemetry::start(&config.telemetry, names.clone(), |k| std::env::var(k).ok())?;
        let quota = Arc::new(
            Quota::new(
                &config.limits,
                config.gateway.client_ip_header.clone(),
                Arc::new(chrono::Utc::now),
            )
            .map_err(|e| CollectorError::Limits(e.to_string()))?,
        );
        if let Some(s) = quota.shared() {
            others.push(Box::new(s.stats.clone()));
            others.push(Box::new(quota.drift().clone()));
        }
        others.insert(0, Box::new(tap.counters().clone()));
        others.insert(1, Box::new(Estimates(listed)));
        if let Some(t) = &telemetry {
            others.push(Box::new(t.stats()));
        }
        let observe = Arc::new(Observe {
            metrics: GatewayMetrics::new(config, names, others),
            telemetry: telemetry.map(Arc::new),
        });
        let screen = Screen::new(
            &config.guards,
            &upstreams,
            observe.metrics.guard_matches.clone(),
            observe.metrics.guard_moderation_failures.clone(),
        )?;
        let cache = Cache::new(
            &config.cache,
            config.limits.redis.as_ref(),
            &config.routes,
            &upstreams,
            observe.metrics.cache_lookups.clone(),
            observe.metrics.cache_stores.clone(),
        )
        .map_err(|e| CollectorError::Limits(e.to_string()))?;
        Ok(Self {
            screen,
            cache: Arc::new(cache),
            keyring: Keyring::new(&config.consumers),
            routes: Routes::new(&config.routes, &upstreams),
            ledger: Arc::new(Ledger {
                tap,
                pricing: Pricing::new(catalog),
                instance: config.gateway.instance.clone(),
                client_ip: config.gateway.client_ip,
                observe: observe.clone(),
            }),
            max_body_bytes: config.gateway.max_body_bytes,
            max_response_bytes: config.gateway.max_response_bytes,
            observe,
            quota,
            admin_token: config.gateway.admin_token.clone(),
        })
    }
}

/// Dollar limits and budgets price requests with the catalog: a routed
/// model without a price counts $0 against them, which the operator should
/// know before a client finds it.
fn warn_unpriced(config: &Config, catalog: &PriceCatalog) {
    use crate::config::limits::Unit;
    let l = &config.limits;
    let dollars = !l.budgets.is_empty()
        || (l.rate_limits.iter()).any(|r| r.limits.iter().any(|x| x.unit == Unit::Usd));
    if !dollars {
        return;
    }
    let now = chrono::Utc::now();
    for r in &config.routes {
        for t in &r.targets {
            let model = t.model.as_deref().unwrap_or(&r.model);
            if model.contains(['*', '?', '[']) {
                tracing::warn!(
                    route = %r.model,
                    "dollar limits and budgets: this glob route sends the client's model name upstream; names without a price count $0 against them"
                );
            } else if catalog.price(model, now).is_none() {
                tracing::warn!(
                    model,
                    route = %r.model,
                    "dollar limits and budgets: this model has no price in the catalog, so its requests count $0 against them"
                );
            }
        }
    }
}
