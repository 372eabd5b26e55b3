//! Pricing attempts from the catalog in force at the request's start.

use std::collections::HashSet;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use tollgate_schemas::{PriceCatalog, Tokens, Usd};

/// Unknown models remembered for their one warning; past this many, a
/// client sending made-up names cannot grow the set (or the log) further.
const MAX_WARNED_MODELS: usize = 1024;

/// The price catalog plus the memory of which unknown models were already
/// warned about (one warning per model, not per request).
pub struct Pricing {
    catalog: PriceCatalog,
    warned: Mutex<HashSet<String>>,
}

impl Pricing {
    pub fn new(catalog: PriceCatalog) -> Self {
        Self {
            catalog,
            warned: Mutex::new(HashSet::new()),
        }
    }

    pub fn version(&self) -> &str {
        self.catalog.version()
    }

    /// Cost of `tokens` on `model` at `at`; `None` (and one warning) for a
    /// model the catalog does not know. Zero tokens cost zero either way.
    pub fn cost(&self, model: &str, tokens: &Tokens, at: DateTime<Utc>) -> Option<Usd> {
        if tokens.total() == 0 {
            return Some(Usd::ZERO);
        }
        match self.catalog.price(model, at) {
            Some(p) => Some(p.cost(tokens)),
            None => {
                if let Ok(mut warned) = self.warned.lock()
                    && warned.len() < MAX_WARNED_MODELS
                    && warned.insert(model.to_string())
                {
                    tracing::warn!(
                        model,
                        "model has no price in the catalog; its cost is recorded as null"
                    );
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_models_cost_null_but_zero_tokens_cost_zero() {
        let p = Pricing::new(PriceCatalog::shipped().unwrap());
        let now = Utc::now();
        assert_eq!(p.cost("mystery", &Tokens::default(), now), Some(Usd::ZERO));
        assert_eq!(p.cost("mystery", &Tokens::new(1, 0, 1, 0), now), None);
        assert!(
            p.cost("qwq-32b", &Tokens::new(1_000_000, 0, 0, 0), now)
                .is_some()
        );
    }
}
