//! Model name -> the ordered upstream attempts for one request.
//!
//! A route matches by exact name first, then by glob in config order. Each
//! route picks one of its targets by weight; its fallback chain appends one
//! target of each named route, tried in order.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{FallbackTrigger, RouteCache, RouteConfig};
use crate::upstream::Upstream;

pub struct Target {
    pub upstream: Arc<Upstream>,
    /// Name sent upstream; `None` = the client's name.
    pub model: Option<String>,
    pub weight: u32,
}

pub struct Route {
    pub model: String,
    pub targets: Vec<Target>,
    total_weight: u32,
    /// Indices of the fallback routes, in order.
    fallback: Vec<usize>,
    pub fallback_on: Vec<FallbackTrigger>,
    /// The response cache; `None` when off.
    pub cache: Option<RouteCache>,
}

/// One planned upstream attempt.
#[derive(Clone)]
pub struct Candidate {
    pub upstream: Arc<Upstream>,
    /// The model name sent upstream.
    pub model: String,
    /// The route this attempt belongs to (what a client would call it).
    pub route_model: String,
}

pub struct Routes {
    routes: Vec<Route>,
    exact: HashMap<String, usize>,
    globs: Vec<(glob::Pattern, usize)>,
}

impl Routes {
    /// `upstreams` must hold every upstream the routes name (the config
    /// validation guarantees it); unknown names are skipped.
    pub fn new(configs: &[RouteConfig], upstreams: &HashMap<String, Arc<Upstream>>) -> Self {
        let mut routes = Vec::new();
        let mut exact = HashMap::new();
        let mut globs = Vec::new();
        for (i, c) in configs.iter().enumerate() {
            let targets: Vec<Target> = c
                .targets
                .iter()
                .filter_map(|t| {
                    Some(Target {
                        upstream: upstreams.get(&t.upstream)?.clone(),
                        model: t.model.clone(),
                        weight: t.weight.max(1),
                    })
                })
                .collect();
            let is_glob = c.model.contains(['*', '?', '[']);
            match (is_glob, glob::Pattern::new(&c.model)) {
                (true, Ok(p)) => globs.push((p, i)),
                _ => {
                    exact.insert(c.model.clone(), i);
                }
            }
            routes.push(Route {
                model: c.model.clone(),
                total_weight: targets.iter().map(|t| t.weight).sum(),
                targets,
                fallback: Vec::new(),
                fallback_on: c.fallback_on.clone(),
                cache: c.cache.clone(),
            });
        }
        for (i, c) in configs.iter().enumerate() {
            routes[i].fallback = c
                .fallback
                .iter()
                .filter_map(|f| exact.get(f).copied())
                .collect();
        }
        Self {
            routes,
            exact,
            globs,
        }
    }

    pub fn resolve(&self, model: &str) -> Option<&Route> {
        let i = self.exact.get(model).copied().or_else(|| {
            self.globs
                .iter()
                .find(|(g, _)| g.matches(model))
                .map(|(_, i)| *i)
        })?;
        self.routes.get(i)
    }

    /// The attempts for a request to `route` for `requested`: one weighted
    /// pick from the route, then one from each fallback route.
    pub fn plan(&self, route: &Route, requested: &str) -> Vec<Candidate> {
        let mut out = Vec::with_capacity(1 + route.fallback.len());
        out.extend(route.pick(requested));
        for &i in &route.fallback {
            if let Some(r) = self.routes.get(i) {
                out.extend(r.pick(&r.model));
            }
        }
        out
    }

    /// Exact-name routes, for `GET /v1/models`.
    pub fn exact_models(&self) -> impl Iterator<Item = &str> {
        self.routes
            .iter()
            .filter(|r| self.exact.contains_key(&r.model))
            .map(|r| r.model.as_str())
    }
}

impl Route {
    fn pick(&self, requested: &str) -> Option<Candidate> {
        let t = if self.targets.len() == 1 {
            self.targets.first()?
        } else {
            let mut roll = fastrand::u32(0..self.total_weight.max(1));
            self.targets.iter().find(|t| {
                if roll < t.weight {
                    true
                } else {
                    roll -= t.weight;
                    false
                }
            })?
        };
        Some(Candidate {
            upstream: t.upstream.clone(),
            model: t.model.clone().unwrap_or_else(|| requested.to_string()),
            route_model: self.model.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, UpstreamKind};

    fn routes(text: &str) -> Routes {
        let cfg = Config::from_toml(text).unwrap();
        let ups = cfg
            .upstreams
            .values()
            .map(|u| {
                let UpstreamKind::Simulated(s) = &u.kind else {
                    panic!("simulated only")
                };
                (
                    u.name.clone(),
                    Arc::new(Upstream::simulated(&u.name, &u.provider, s.clone())),
                )
            })
            .collect();
        Routes::new(&cfg.routes, &ups)
    }

    const TEXT: &str = r#"
        [upstreams.a]
        kind = "simulated"
        [upstreams.b]
        kind = "simulated"
        [[routes]]
        model = "qwen-max"
        targets = [{ upstream = "a" }]
        [[routes]]
        model = "qwen-*"
        targets = [{ upstream = "b" }]
        [[routes]]
        model = "*"
        targets = [{ upstream = "a", model = "catch-all" }]
        [[routes]]
        model = "deepseek-r1"
        targets = [{ upstream = "a", model = "deepseek-reasoner", weight = 3 }, { upstream = "b", model = "deepseek-reasoner", weight = 1 }]
        fallback = ["qwen-max"]
    "#;

    #[test]
    fn exact_beats_glob_and_globs_go_in_order() {
        let r = routes(TEXT);
        assert_eq!(r.resolve("qwen-max").unwrap().model, "qwen-max");
        assert_eq!(r.resolve("qwen-plus").unwrap().model, "qwen-*");
        assert_eq!(r.resolve("anything").unwrap().model, "*");
        let plan = r.plan(r.resolve("qwen-plus").unwrap(), "qwen-plus");
        assert_eq!(
            plan[0].model, "qwen-plus",
            "a glob route passes the client's name on"
        );
        assert_eq!(r.plan(r.resolve("x").unwrap(), "x")[0].model, "catch-all");
    }

    #[test]
    fn fallback_chain_and_weights() {
        let r = routes(TEXT);
        let route = r.resolve("deepseek-r1").unwrap();
        let mut on_a = 0;
        for _ in 0..4000 {
            let plan = r.plan(route, "deepseek-r1");
            assert_eq!(plan.len(), 2);
            assert_eq!(plan[1].route_model, "qwen-max");
            if plan[0].upstream.name() == "a" {
                on_a += 1;
            }
        }
        assert!((2700..3300).contains(&on_a), "3:1 weights gave {on_a}/4000");
        let models: Vec<&str> = r.exact_models().collect();
        assert_eq!(models, ["qwen-max", "deepseek-r1"]);
    }
}
