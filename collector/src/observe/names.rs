//! The names a label may take: the configured consumers, routes (names
//! and globs), target models and upstreams, each allocated once. The
//! Prometheus labels, the OpenTelemetry metric attributes and span names
//! take their values from here, so none grows with what clients send.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::Config;

/// A label value: one of the configured names, allocated once.
pub type Name = Arc<str>;

/// The configured names label values may take, each allocated once;
/// shared with the OpenTelemetry metrics and span names, which are bounded
/// the same way.
#[derive(Debug)]
pub struct Names {
    consumers: HashMap<String, Name>,
    routes: HashMap<String, Name>,
    globs: Vec<(glob::Pattern, Name)>,
    served: HashMap<String, Name>,
    upstreams: HashMap<String, Name>,
    none: Name,
    other: Name,
}

impl Names {
    pub fn new(config: &Config) -> Self {
        let named = |names: &mut dyn Iterator<Item = &String>| -> HashMap<String, Name> {
            names.map(|n| (n.clone(), Name::from(n.as_str()))).collect()
        };
        let mut routes = HashMap::new();
        let mut globs = Vec::new();
        let mut served: HashMap<String, Name> = HashMap::new();
        for r in &config.routes {
            let name = Name::from(r.model.as_str());
            match glob::Pattern::new(&r.model) {
                Ok(p) if r.model.contains(['*', '?', '[']) => globs.push((p, name)),
                _ => {
                    routes.insert(r.model.clone(), name.clone());
                    served.insert(r.model.clone(), name);
                }
            }
            for t in r.targets.iter().filter_map(|t| t.model.as_ref()) {
                served.insert(t.clone(), Name::from(t.as_str()));
            }
        }
        Self {
            consumers: named(&mut config.consumers.iter().map(|c| &c.name)),
            routes,
            globs,
            served,
            upstreams: named(&mut config.upstreams.keys()),
            none: Name::from("-"),
            other: Name::from("other"),
        }
    }

    /// A configured consumer, else `-`.
    pub fn consumer(&self, name: Option<&str>) -> Name {
        name.and_then(|n| self.consumers.get(n))
            .unwrap_or(&self.none)
            .clone()
    }

    /// The route a requested model resolves to (its name or glob), else
    /// `other`; `-` without a model.
    pub fn model(&self, name: Option<&str>) -> Name {
        let Some(name) = name else {
            return self.none.clone();
        };
        if let Some(n) = self.routes.get(name) {
            return n.clone();
        }
        self.globs
            .iter()
            .find(|(p, _)| p.matches(name))
            .map_or_else(|| self.other.clone(), |(_, n)| n.clone())
    }

    /// A configured target model or exact route, else `other`; `-` when
    /// nothing served.
    pub fn served(&self, name: Option<&str>) -> Name {
        match name {
            None => self.none.clone(),
            Some(n) => self.served.get(n).unwrap_or(&self.other).clone(),
        }
    }

    /// A configured upstream, else `other`.
    pub fn upstream(&self, name: &str) -> Name {
        self.upstreams.get(name).unwrap_or(&self.other).clone()
    }
}
