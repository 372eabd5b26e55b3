//! The gateway's shared state: everything a request reads, built once from
//! the config (keys, routes and upstreams, the ledger, limits on sizes).
//! Handlers import the state, never the router.

use std::collections::HashMap;
use std::sync::Arc;

use tollgate_schemas::PriceCatalog;

use crate::CollectorError;
use crate::config::Config;
use crate::ledger::tap::Tap;
use crate::ledger::{Ledger, Pricing};
use crate::metrics;
use crate::proxy::auth::Keyring;
use crate::proxy::routing::Routes;
use crate::upstream::Upstream;

pub struct Gateway {
    pub keyring: Keyring,
    pub routes: Routes,
    pub ledger: Arc<Ledger>,
    pub max_body_bytes: usize,
    pub max_response_bytes: usize,
    /// Every configured upstream, for their counters on `/metrics`.
    pub upstreams: Vec<Arc<Upstream>>,
    /// Other parts of the process shown on `/metrics`.
    pub metrics: Vec<Arc<dyn metrics::Source>>,
}

impl Gateway {
    pub fn new(config: &Config, tap: Arc<Tap>) -> Result<Self, CollectorError> {
        let catalog = match &config.gateway.prices {
            Some(path) => PriceCatalog::load(path)?,
            None => PriceCatalog::shipped()?,
        };
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
        Ok(Self {
            keyring: Keyring::new(&config.consumers),
            routes: Routes::new(&config.routes, &upstreams),
            upstreams: listed,
            ledger: Arc::new(Ledger {
                tap,
                pricing: Pricing::new(catalog),
                instance: config.gateway.instance.clone(),
                client_ip: config.gateway.client_ip,
            }),
            max_body_bytes: config.gateway.max_body_bytes,
            max_response_bytes: config.gateway.max_response_bytes,
            metrics: Vec::new(),
        })
    }
}
